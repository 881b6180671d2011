"""`cascade-bench run/report/plot` end to end on a tiny config: files, tables, plots, resume, errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cascade_bench.cli import main
from cascade_bench.data.batch import IGNORE_INDEX
from cascade_bench.data.prepare import prepare_data
from cascade_bench.experiment import cascades
from cascade_bench.experiment.config import ExperimentConfig, make_config
from cascade_bench.experiment.pipeline import run_experiment
from cascade_bench.experiment.records import record_differences
from cascade_bench.experiment.results_store import SCHEMA_VERSION, ResultsStore

TINY = dict(
    name="tiny",
    tokenizer="bpe:300",
    preset="gpt2-tiny",
    seq_len=32,
    batch_size=8,
    eval_stride=32,
    max_epochs=1,
    max_steps_per_epoch=3,
    hard_ratios=(0.3, 0.6),
    timing_repeats=1,
    eval_batches=2,
    timing_batches=1,
)
#: For tests about something else than exit rules: the trained-with rule only, no risk-controlled points.
ONE_RULE = dict(exit_rules=("max_prob",), risk="")
QUALITY = (
    "ppl",
    "accuracy",
    "hard_ppl",
    "exit_ratios",
    "tokens_entered",
    "layer_cost",
    "flops",
    "flops_analytic",
    "thresholds",
)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    config = make_config({**TINY, "out": str(tmp_path_factory.mktemp("run"))})
    return config, run_experiment(config, progress=False)


def test_run_writes_results_tables_plots_and_report(finished):
    config, paths = finished
    records = list(ResultsStore(paths["results"]))
    ids = [r.point_id for r in records]
    rules = ["cos_sim", "classifier", "lowrank:32"]  # the default exit_rules after the trained-with max_prob
    assert ids == [
        "full",
        "prefix-0",
        "dense",
        "routed@0.3",
        "masked@0.3",
        "routed@0.6",
        "masked@0.6",
        *[f"routed[{rule}]@{r}" for rule in rules for r in ("0.3", "0.6")],
        *[f"risk[{rule}]" for rule in ["max_prob", *rules]],
        *[f"kv[{policy}]@0.6" for policy in ("absent", "propagate", "recompute")],
        "oracle",
    ]
    lines = [json.loads(line) for line in paths["results"].read_text().splitlines()]
    assert all(line["schema_version"] == SCHEMA_VERSION for line in lines) and len(lines) == len(records)
    routed = next(r for r in records if r.point_id == "routed@0.6")
    for key in (
        "ppl",
        "accuracy",
        "hard_ppl",
        "easy_ppl",
        "exit_ratios",
        "layer_cost",
        "flops",
        "flops_analytic",
        "time_median_s",
        "time_iqr_s",
        "tokens_per_s",
        "peak_memory_bytes",
    ):
        assert getattr(routed, key) is not None, key
    # Counted at the anchors (baselines, the hard ratio nearest 0.5), analytic elsewhere: equal where both.
    counted = {r.point_id for r in records if r.flops is not None}
    assert counted == {
        "full",
        "prefix-0",
        "dense",
        "routed@0.6",
        "masked@0.6",
        *[f"routed[{rule}]@0.6" for rule in rules],
        *[f"kv[{policy}]@0.6" for policy in ("absent", "propagate", "recompute")],
    }
    assert all(r.flops == r.flops_analytic for r in records if r.point_id in counted)
    assert routed.conditions["timed_batches"] == 1 and routed.conditions["batches"] == 2
    # the FLOPs a wall time compares with: the timed batch alone, a part of the scored batches' count
    assert 0 < routed.flops_analytic_timed < routed.flops_analytic
    assert routed.conditions["flops_counted"]
    assert "FLOPs counted with FlopCounterMode on the baselines" in routed.conditions["measured"]
    training = routed.conditions["training"]
    assert training["protocol"] == "ashem" and training["stage_kind"] == "block"
    assert [s["stop_reason"] for s in training["stages"]] == ["epoch cap", "epoch cap"]
    assert [s["epochs"] for s in training["stages"]] == [1, 1] and training["stages"][1]["lr"] == 1e-4
    dense = next(r for r in records if r.point_id == "dense")
    assert dense.conditions["dense_training"]["stop_reason"] == "epoch cap"
    for key in (
        "dataset",
        "split",
        "window",
        "stride",
        "tokenizer",
        "dtype",
        "device",
        "threads",
        "batch_shapes",
        "seed",
        "torch",
        "transformers",
        "git_commit",
    ):
        assert key in routed.conditions, key
    tables = paths["tables"]
    paper = pd.read_csv(tables / "tiny.paper.csv")
    assert list(paper.columns) == [
        "method",
        *("PPL", "PPL low", "PPL high"),
        *("PPL - full", "PPL - full low", "PPL - full high"),
        "vs full",
        *("accuracy", "accuracy low", "accuracy high"),
        "exit at stage 0",
        "layer cost",
        "FLOP ratio",
        "decision share of FLOPs",
        *("wall ratio", "wall ratio low", "wall ratio high"),
        "realised / FLOP-predicted",
        "realised / layer ideal",
        "PPL at matched FLOPs",
    ]
    passes = paper[paper.method != "oracle bound"]
    assert (passes["PPL low"] <= passes.PPL).all() and (passes.PPL <= passes["PPL high"]).all()
    assert (passes["PPL - full low"] <= passes["PPL - full high"]).all()
    assert paper.iloc[0]["vs full"] == "same" and paper.iloc[0]["PPL - full"] == 0.0
    assert set(passes["vs full"][1:]) <= {"better", "worse", "not distinguishable"}
    for _, row in passes[1:].iterrows():  # the verdict is what the paired interval says
        low, high = row["PPL - full low"], row["PPL - full high"]
        expected = "worse" if low > 0 else "better" if high < 0 else "not distinguishable"
        assert row["vs full"] == expected, row.method
    timed = passes[passes["wall ratio"].notna() & (passes.method != "full cascade")]
    routed_row = timed[timed.method == "routed EE @ hard 0.6"].iloc[0]
    assert routed_row["realised / layer ideal"] == pytest.approx(routed_row["layer cost"] / routed_row["wall ratio"])
    intervals = next(r for r in records if r.point_id == "routed@0.6").intervals
    assert intervals["unit"] == "window" and intervals["units"] == 16 and intervals["resamples"] == 2000
    assert r"$\pm$" in (tables / "tiny.paper.tex").read_text()
    run = json.loads((tables / "tiny.run.json").read_text())
    assert set(run["seconds"]) == {"preparation", "training", "sweep", "timing", "report"}
    assert run["stage_reuse"]["reused_calls"] > 0 and run["stage_reuse"]["refused_bytes"] == 0
    assert list(paper.method) == [
        "full cascade",
        "stage 0 alone",
        "dense, same depth",
        "routed EE @ hard 0.6",
        *[f"routed EE [{rule}] @ hard 0.6" for rule in rules],
        "masked EE @ hard 0.6",
        *[f"risk-controlled [{rule}]" for rule in ["max_prob", *rules]],
        "oracle bound",
    ]  # 0.6 is nearest 0.5
    assert paper.iloc[0]["decision share of FLOPs"] == 0.0
    by_id = {r.point_id: r for r in records}
    # max_prob decides with stage 0's full head on every token reaching it; logit-free rules do not.
    assert by_id["routed@0.6"].decision_flops > by_id["routed[cos_sim]@0.6"].decision_flops == 0
    assert 0 < by_id["routed[classifier]@0.6"].decision_flops < by_id["routed@0.6"].decision_flops
    # rank 32 = the tiny preset's hidden size: the low-rank head is exact, so it decides like max_prob
    assert by_id["routed[lowrank:32]@0.6"].agreement_with_max_prob == 1.0
    assert by_id["routed[lowrank:32]@0.6"].tokens_exited == by_id["routed@0.6"].tokens_exited
    rules_table = pd.read_csv(tables / "tiny.rules.csv")
    assert list(rules_table["exit rule"]) == ["max_prob (trained with)", *rules]
    risk = pd.read_csv(tables / "tiny.risk.csv")
    assert list(risk["exit rule"]) == ["max_prob", *rules] and set(risk.delta) == {0.1}
    assert {"torch", "transformers", "install", "git_commit"} <= set(by_id["oracle"].conditions)
    # risk control tested on the odd batches of its own held-out part of validation (the last 4)
    data = prepare_data(
        config.corpus,
        config.tokenizer,
        config.seq_len,
        config.batch_size,
        config.eval_stride,
        cache_dir=paths["tokenizers"],
    )
    held = data.validation[-config.risk_batches :]
    assert config.risk_batches == 4 and routed.conditions["validation_batches_held_out"] == 4
    testing_tokens = sum(int((batch["targets"] != IGNORE_INDEX).sum()) for batch in held[1::2])
    for rule in ["max_prob", *rules]:
        control = by_id[f"risk[{rule}]"].risk_control
        assert control["tokens"] == testing_tokens and control["calibration"].startswith("held out: the last 4")
        assert control["empirical_risk"] <= control["upper_bound"] or control["bound"] == "exact"
        assert 0 <= by_id[f"risk[{rule}]"].realised_risk <= 1
    # K/V policies at the routed point's thresholds: padded batching decides exactly as bucketed does,
    # stage 0 is the same under every policy, and each policy's extra work is what it says.
    kv = pd.read_csv(tables / "tiny.kv.csv").set_index("K/V policy")
    routed_06 = by_id["routed@0.6"]
    assert math.isclose(kv.loc["absent", "PPL"], routed_06.ppl, rel_tol=1e-6)
    assert set(kv["exit at stage 0"]) == {routed_06.exit_ratios[0]}
    assert kv.loc["propagate", "propagated K/V (token x stage)"] == routed_06.tokens_exited[0]
    assert kv.loc["recompute", "recomputed tokens"] > 0 == kv.loc["absent", "recomputed tokens"]
    assert kv.loc["recompute", "layer cost"] > kv.loc["absent", "layer cost"] == kv.loc["propagate", "layer cost"]
    assert kv.loc["propagate", "FLOP ratio"] > kv.loc["absent", "FLOP ratio"]
    assert "## K/V policies for exited tokens" in paths["report"].read_text()
    full = paper.iloc[0]
    assert (full["layer cost"], full["FLOP ratio"], full["wall ratio"]) == (1.0, 1.0, 1.0)
    assert paper.iloc[1]["layer cost"] == 0.5  # stage 0 alone: half the layers of the cascade
    sweep = pd.read_csv(tables / "tiny.thresholds.csv")
    assert len(sweep) == 4 and list(sweep.columns[:5]) == [
        "method",
        "hard ratio",
        "threshold",
        "exit at stage 0",
        "PPL",
    ]
    wall_flops = pd.read_csv(tables / "tiny.wall_flops.csv")
    assert list(wall_flops["hard ratio"]) == ["0.3", "0.6", "median"]
    for ratio in ("0.3", "0.6"):
        row = wall_flops.set_index("hard ratio").loc[ratio]
        point = by_id[f"routed@{ratio}"]
        assert math.isclose(
            row["FLOP ratio (timed batches)"], point.flops_analytic_timed / by_id["full"].flops_analytic_timed
        )
        assert math.isclose(row["wall - FLOP"], row["wall ratio"] - row["FLOP ratio (timed batches)"])
    assert math.isclose(wall_flops["wall - FLOP"].iloc[-1], wall_flops["wall - FLOP"].iloc[:2].median())
    assert r"\toprule" in (tables / "tiny.paper.tex").read_text()
    assert "| quantity | this run |" in (tables / "tiny.seed.md").read_text()
    report = paths["report"].read_text()
    assert "## Methods" in report and "plots/tiny.cost_vs_ppl.png" in report
    assert "## Exit rules" in report and "## Risk-controlled thresholds" in report
    assert "## Wall time against FLOPs" in report
    assert "classifier exit classifier of stage 0" in report  # its training stop is checked too
    assert "Protocol ashem, preset gpt2-tiny: one model grown block by block" in report
    assert (
        "## Checks" in report
        and "[FLAG] every trained part stopped by early stopping on whole epochs: stage 0 stopped at the epoch cap"
        in report
    )
    assert "## Training" in report and "| stage 1 | 2 | 0.0001 |" in report
    import matplotlib.image as mpimg

    for stem in ("cost_vs_ppl", "exit_ratios", "confidence"):
        image = mpimg.imread(paths["plots"] / f"tiny.{stem}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # not blank
        assert (paths["plots"] / f"tiny.{stem}.pdf").stat().st_size > 1000


def test_an_interrupted_sweep_resumes_to_the_same_records(finished, tmp_path):
    config, paths = finished
    resumed = make_config({**TINY, "out": str(tmp_path)})
    seen = []

    def stop_after_three(point_id):
        seen.append(point_id)
        if len(seen) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(resumed, progress=False, on_point=stop_after_three)
    partial = ResultsStore(tmp_path / "results" / "tiny.jsonl")
    assert len(partial) == 3
    run_experiment(resumed, progress=False)  # picks up where it stopped
    again = {r.point_id: r for r in ResultsStore(tmp_path / "results" / "tiny.jsonl")}
    whole = {r.point_id: r for r in ResultsStore(paths["results"])}
    assert list(again) == list(whole)
    for point_id, record in whole.items():
        for key in QUALITY:
            assert _same(getattr(again[point_id], key), getattr(record, key)), (point_id, key)


def test_the_sweep_measures_the_same_records_with_and_without_stage_reuse(finished, tmp_path):
    """The default config's sweep keeps stage work shared by its points (``routing.stage_reuse``); with
    ``reuse_memory_mb = 0`` every pass computes everything, as before reuse existed: same records."""
    config, paths = finished
    for folder in ("models", "cache"):  # the same trained cascade, dense model and tokenizer
        shutil.copytree(config.out_dir / folder, tmp_path / folder)
    plain = make_config({**TINY, "out": str(tmp_path), "reuse_memory_mb": 0})
    run_experiment(plain, progress=False)
    with_reuse, without = (list(ResultsStore(p)) for p in (paths["results"], tmp_path / "results" / "tiny.jsonl"))
    assert len(with_reuse) == len(without) > 10
    assert record_differences(with_reuse, without) == []
    confidences = [
        json.loads((out / "results" / "tiny.confidence.json").read_text()) for out in (config.out_dir, tmp_path)
    ]
    assert confidences[0] == confidences[1]  # the report's confidence pass read the kept stage work


def _same(a, b) -> bool:
    """Equality where NaN equals NaN (a stage prefix has no hard tokens, so no hard PPL)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_a_changed_config_does_not_resume_into_old_records(finished, capsys):
    config, paths = finished
    argv = [
        "run",
        "--out",
        config.out,
        "--name",
        "tiny",
        "--tokenizer",
        "bpe:300",
        "--preset",
        "gpt2-tiny",
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--eval-stride",
        "32",
        "--max-epochs",
        "2",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "holds points measured with another config" in err and "'max_epochs'" in err and len(err.splitlines()) == 1


def test_compare_runs_of_two_protocols_at_matched_flops_sharing_one_dense_model(finished, tmp_path, capsys):
    config, paths = finished
    other = make_config({**TINY, **ONE_RULE, "out": config.out, "name": "tiny-cascade", "protocol": "cascade"})
    run_experiment(other, progress=False)
    dense_folders = list((config.out_dir / "models").glob("dense-*"))
    assert len(dense_folders) == 1  # trained once, reused by the second protocol
    records = list(ResultsStore(config.out_dir / "results" / "tiny-cascade.jsonl"))
    assert records[0].conditions["training"]["stage_kind"] == "llm"
    stem = tmp_path / "cmp"
    assert main(["compare", "tiny", "tiny-cascade", "--out", config.out, "--to", str(stem)]) == 0
    table = pd.read_csv(stem.with_suffix(".csv"))
    assert list(table.method) == ["ashem (tiny)", "cascade (tiny-cascade)", "dense, same depth"]
    assert list(table["exit rule"]) == ["max_prob", "cos_sim", "no exit"]  # cascade's own rule (its spec's)
    assert (
        main(["compare", "tiny", "tiny-cascade", "--out", config.out, "--to", str(stem), "--exit-rule", "max_prob"])
        == 0
    )
    same_rule = pd.read_csv(stem.with_suffix(".csv"))
    assert list(same_rule["exit rule"]) == ["max_prob", "max_prob", "no exit"]
    cascade_records = list(ResultsStore(config.out_dir / "results" / "tiny-cascade.jsonl"))
    by_rule = {r.exit_rule: r for r in cascade_records if r.method == "routed" and r.hard_ratio == 0.6}
    assert set(by_rule) == {"max_prob", "cos_sim"}
    assert same_rule.loc[1, "routed @ hard 0.6 PPL"] == pytest.approx(by_rule["max_prob"].ppl)
    assert table.loc[1, "routed @ hard 0.6 PPL"] == pytest.approx(by_rule["cos_sim"].ppl)
    assert table["full depth FLOPs ratio"].tolist() == [1.0, 1.0, 1.0]  # same layers, one head at the end
    assert table.loc[2, "PPL @ 1x FLOPs"] == table.loc[2, "full depth PPL"]
    assert "| method |" in capsys.readouterr().out
    assert main(["compare", "tiny", "tiny-cascade", "--layout", "seed", "--out", config.out, "--to", str(stem)]) == 0
    seed = pd.read_csv(stem.with_suffix(".csv")).set_index("quantity")
    assert list(seed.columns) == ["ASHEM seed (published)", "tiny", "tiny-cascade"]
    assert seed.loc["hard PPL after", "ASHEM seed (published)"] == 668.08
    assert seed.loc["hard tokens trained on", "ASHEM seed (published)"] == 32768 == 256 * 128
    stage1 = next(
        s for s in next(iter(ResultsStore(paths["results"]))).conditions["training"]["stages"] if s["stage"] == 1
    )
    assert seed.loc["hard tokens trained on", "tiny"] == stage1["hard_tokens_trained_on"]
    assert seed.loc["stage-1 best epoch", "tiny"] == stage1["best_epoch"]
    assert seed.loc["stage-1 trainable parameters", "tiny"] == stage1["trainable_parameters"] > 0
    prefix = next(r for r in ResultsStore(paths["results"]) if r.point_id == "prefix-0")
    assert seed.loc["stage-0 PPL", "tiny"] == pytest.approx(prefix.ppl)
    capsys.readouterr()
    assert main(["compare", "tiny", "missing", "--out", config.out]) == 2
    assert "no results for run 'missing'" in capsys.readouterr().err


def test_leaky_and_leak_free_runs_share_one_trained_stage0(finished, monkeypatch):
    config, paths = finished
    trained = []
    real = cascades.train_protocol

    def spy(ensemble, *args, **kwargs):
        trained.append((len(ensemble), kwargs.get("trained_stages", 0)))
        return real(ensemble, *args, **kwargs)

    monkeypatch.setattr(cascades, "train_protocol", spy)
    leaky = make_config({**TINY, **ONE_RULE, "out": config.out, "name": "tiny-leaky", "leaky_seed_protocol": True})
    assert leaky.stage0_key() == config.stage0_key() and leaky.training_key() != config.training_key()
    run_experiment(leaky, progress=False)
    assert trained == [(1, 1)]  # stage 0 loaded from the first run; only stage 1 trained
    assert (paths["stage0"] / "cascade.json").exists()
    first, second = (
        next(r for r in ResultsStore(p) if r.point_id == "prefix-0")
        for p in (paths["results"], config.out_dir / "results" / "tiny-leaky.jsonl")
    )
    assert first.conditions["training"]["stages"][0] == second.conditions["training"]["stages"][0]
    assert second.conditions["training"]["stages"][1]["stage"] == 1


def test_patience_replaces_the_protocols_and_keys_what_it_trains():
    config = make_config(TINY)
    assert config.training_protocol.patience == (1, 3) and config.dense_recipe[1] == 1
    patient = make_config({**TINY, "patience": [3, 3]})
    assert patient.training_protocol.patience == (3, 3) and patient.dense_recipe[1] == 3
    assert patient.training_protocol.lrs == config.training_protocol.lrs
    # stage 0, the dense model and the cascade all train differently, so none is shared with the default
    for key in ("training_key", "stage0_key", "dense_key"):
        assert getattr(patient, key)() != getattr(config, key)()
    assert make_config({**TINY, "patience": [3, 3], "dense_patience": 2}).dense_recipe[1] == 2


def test_protocol_keys_set_from_the_config_and_what_the_empty_ones_mean():
    config = make_config(TINY)
    assert make_config({**TINY, "eval_stride": 0}).eval_stride == 16  # 0: half the window
    assert ExperimentConfig().eval_stride == ExperimentConfig().seq_len // 2 == 64
    for key in ("training_key", "stage0_key", "dense_key"):  # validation windows steer early stopping
        assert getattr(make_config({**TINY, "eval_stride": 16}), key)() != getattr(config, key)()
    assert config.exit_rule == "max_prob" and make_config({**TINY, "protocol": "cascade"}).exit_rule == "cos_sim"
    lash = make_config({**TINY, "layers": [2, 2, 2], "training_hard_ratios": [0.5, 0.25], "exit_head": "frozen"})
    protocol = lash.training_protocol
    assert (protocol.layers, protocol.boundary_hard_ratios, protocol.exit_head) == ((2, 2, 2), (0.5, 0.25), "frozen")
    assert protocol.lrs == (1e-3, 1e-4, 1e-4) and protocol.patience == (1, 3, 3)  # the last stage's recipe again
    assert lash.training_key() != config.training_key() and lash.stage0_key() == config.stage0_key()
    deep = make_config({**TINY, "protocol": "deep", "layers": [1, 1, 1], "layer_weights": [0.5, 0.5, 1]})
    assert deep.training_protocol.layer_weights == (0.5, 0.5, 1.0)
    decayed = make_config({**TINY, "protocol": "cascade", "lr_decay": 0.25}).training_protocol
    assert decayed.lrs == (1e-3, 2.5e-4) and decayed.lr_decay == 0.25
    for values, key in (
        ({"layers": [1, 1], "layer_weights": [1, 1, 1]}, "layer_weights"),
        ({"protocol": "lego-3", "training_hard_ratios": [0.5, 0.4, 0.3]}, "training_hard_ratios"),
        ({"exit_head": "own"}, "exit_head"),
        ({"lr_decay": 1.5}, "lr_decay"),
        ({"layers": [2, 0]}, "layers"),
    ):
        with pytest.raises(ValueError, match=f"config key '{key}'"):
            make_config({**TINY, **values})


def test_report_and_plot_commands_reuse_stored_results(finished, capsys):
    config, paths = finished
    flags = ["--out", config.out, "--name", "tiny"]
    paths["report"].unlink()
    assert main(["report", *flags]) == 0 and paths["report"].exists()
    assert main(["plot", *flags]) == 0
    assert "cost_vs_ppl.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, key",
    [
        (["run", "--seq-len", "-3"], "'seq_len'"),
        (["run", "--hard-ratios", "0.5", "1.5"], "'hard_ratios'"),
        (["run", "--preset", "gpt5"], "'preset'"),
        (["run", "--batch-size", "many"], "'batch_size'"),
        (["run", "--model", "some/folder"], "'boundaries'"),
        (["run", "--model", "some/folder", "--boundaries", "2"], "'tokenizer'"),
        (["run", "--boundaries", "2"], "'boundaries'"),
        (
            ["run", "--model", "some/folder", "--boundaries", "2", "--block-heads", "mine", "--tokenizer", "x"],
            "'block_heads'",
        ),
        (["run", "--count-flops", "some"], "'count_flops'"),
        (["run", "--plausible-ppl", "1000", "5"], "'plausible_ppl'"),
        (["run", "--timing-batches", "-1"], "'timing_batches'"),
        (["run", "--protocol", "ashem2"], "'protocol'"),
        (["run", "--kv-policies", "absent", "fill"], "'kv_policies'"),
        (["run", "--patience", "3"], "'patience'"),
        (["run", "--patience", "3", "0"], "'patience'"),
        (["run", "--protocol", "deep", "--patience", "1", "3"], "'patience'"),
    ],
)
def test_bad_config_values_are_one_line_errors_naming_the_key(argv, key, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and len(err.splitlines()) == 1


def test_config_file_keys_are_checked(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nseq_lenn = 64\n')
    assert main(["run", str(path), "--out", str(tmp_path)]) == 2
    assert "unknown config key 'seq_lenn'" in capsys.readouterr().err
    path.write_text("[data]\nseq_len = 48\neval_stride = 48\n[sweep]\nhard_ratios = [0.25, 0.75]\n")
    from cascade_bench.experiment.config import load_config_file

    config = make_config(load_config_file(path))
    assert config.seq_len == 48 and config.hard_ratios == (0.25, 0.75)
    assert main(["report", "--out", str(tmp_path / "empty")]) == 2
    assert "no results" in capsys.readouterr().err


def test_run_on_a_saved_checkpoint_folder_cuts_it_into_blocks(tmp_path, capsys):
    """The pretrained-model path of `cascade-bench run`: a folder written with save_pretrained
    (model and tokenizer), cut into blocks, exit heads trained with the model frozen."""
    from transformers import AutoModelForCausalLM

    from cascade_bench.data.corpus import load_corpus
    from cascade_bench.data.tokenization import load_tokenizer
    from cascade_bench.stages.presets import stage_config

    folder = tmp_path / "checkpoint"
    tokenizer = load_tokenizer("bpe:300", load_corpus("embedded").documents("train"), cache_dir=tmp_path / "cache")
    tokenizer.save_pretrained(folder)
    AutoModelForCausalLM.from_config(stage_config("gpt2-tiny", num_hidden_layers=3, vocab_size=300)).save_pretrained(
        folder
    )
    out = tmp_path / "run"
    argv = [
        "run",
        "--model",
        str(folder),
        "--tokenizer",
        str(folder),
        "--boundaries",
        "1",
        "2",
        "--block-heads",
        "trained",
        "--name",
        "blocks",
        "--seq-len",
        "32",
        "--eval-stride",
        "32",
        "--batch-size",
        "8",
        "--max-epochs",
        "1",
        "--max-steps-per-epoch",
        "2",
        "--hard-ratios",
        "0.5",
        "--timing-repeats",
        "1",
        "--eval-batches",
        "2",
        "--exit-rules",
        "max_prob",
        "--risk",
        "",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    records = list(ResultsStore(out / "results" / "blocks.jsonl"))
    assert [r.point_id for r in records] == [
        "full",
        "prefix-0",
        "prefix-1",
        "routed@0.5",
        "masked@0.5",
        "kv[absent]@0.5",
        "kv[propagate]@0.5",
        "kv[recompute]@0.5",
        "oracle",
    ]
    training = records[0].conditions["training"]
    assert training["layers_per_block"] == [1, 1, 1] and training["block_heads"] == "trained"
    assert len(training["exit_heads_val_ppl_after"]) == 2
    routed = next(r for r in records if r.method == "routed")
    assert 0 < routed.tokens_entered[2] < routed.tokens_entered[0]
    report = (out / "blocks.report.md").read_text()
    assert "unsplit model" in report and "block 0 alone" in report and "cut into blocks" in report
    assert "Costs are relative to the unsplit model" in report
    # the same blocks measured without stage reuse: the same records
    plain = tmp_path / "plain"
    assert main([*argv[:-1], str(plain), "--reuse-memory-mb", "0"]) == 0
    without = list(ResultsStore(plain / "results" / "blocks.jsonl"))
    assert record_differences(records, without) == []
    kept = json.loads((out / "results" / "blocks.run.json").read_text())["stage_reuse"]
    # every point here is counted (keeps, never reads); the report's confidence pass reads what they kept
    assert kept["kept_bytes"] > 0 and kept["reused_calls"] > 0


def test_shipped_config_files_load_and_the_default_file_is_the_default():
    from pathlib import Path

    from cascade_bench.experiment.config import ExperimentConfig, load_config_file

    folder = Path(__file__).resolve().parents[2] / "configs"
    assert make_config(load_config_file(folder / "default.toml")) == ExperimentConfig()
    for path in sorted(folder.glob("*.toml")):
        make_config(load_config_file(path))  # every shipped config is valid


def test_a_memory_layer_preset_trains_and_evaluates_through_run(tmp_path):
    """The memory family through the whole pipeline: trained, swept, counted == analytic FLOPs, and the
    K/V-policy points it cannot have are named as not run, with the reason, in the report."""
    config = make_config(
        {
            **TINY,
            **ONE_RULE,
            "preset": "memory-tiny",
            "name": "memory",
            "baselines": ("full", "dense"),
            "out": str(tmp_path),
        }
    )
    paths = run_experiment(config, progress=False)
    records = list(ResultsStore(paths["results"]))
    assert [r.point_id for r in records] == ["full", "dense", "routed@0.3", "routed@0.6"]
    assert all(r.flops == r.flops_analytic for r in records if r.flops is not None)
    assert all(math.isfinite(r.ppl) for r in records)
    report = paths["report"].read_text()
    assert "preset memory-tiny" in report and "Not run: kv[policy], because K/V policies need every layer" in report


def _flags(values: dict) -> list[str]:
    return [
        part
        for key, value in values.items()
        for part in ("--" + key.replace("_", "-"), *(map(str, value) if isinstance(value, tuple) else [str(value)]))
    ]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_torchrun_two_ranks_measure_what_one_process_measured(finished, tmp_path):
    """`torchrun --nproc-per-node 2 -m cascade_bench run` on the same config (its own name, and every
    rank timing one batch): it loads the models the one-process run trained, shards every point over
    2 gloo processes, and stores the same quality, exit counts, thresholds and FLOPs; rank 0 alone
    writes and prints."""
    config, paths = finished
    out = tmp_path / "ranks"
    for folder in ("models", "cache"):  # the trained models and tokenizer of the one-process run
        shutil.copytree(Path(config.out) / folder, out / folder)
    # (a torchrun run trains too, on rank 0; reusing them keeps this test to the sweep)
    values = {**TINY, "name": "tiny-ranks", "timing_batches": 2, "out": str(out)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "cascade_bench",
        "run",
        "--quiet",
        *_flags(values),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("tiny-ranks: done in") == 1
    single = {r.point_id: r for r in ResultsStore(paths["results"])}
    parallel = {r.point_id: r for r in ResultsStore(out / "results" / "tiny-ranks.jsonl")}
    assert list(parallel) == list(single)
    for point_id, record in parallel.items():
        assert record.conditions["ranks"] == 2 and single[point_id].conditions.get("ranks", 1) == 1
        for key in ("tokens", "exit_ratios", "tokens_entered", "thresholds", "flops", "flops_analytic", "layer_cost"):
            assert getattr(record, key) == getattr(single[point_id], key), (point_id, key)
        assert record.ppl == pytest.approx(single[point_id].ppl, rel=1e-9), point_id
    assert "2 processes" in (out / "tiny-ranks.report.md").read_text()
    assert sorted(p.name for p in (out / "models").iterdir()) == sorted(
        p.name for p in (Path(config.out) / "models").iterdir()
    )  # nothing trained anew
