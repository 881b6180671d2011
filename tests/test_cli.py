"""The cascade-bench command line, end to end on tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cascade_bench.cli import main


def test_bench_routing_writes_rows_checks_and_conditions(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench-routing",
            "--preset",
            "gpt2-tiny",
            "--layers",
            "1",
            "1",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--hard-ratios",
            "0.5",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
            "--exit-rules",
            "max_prob",
            "cos_sim",
            "classifier",
            "lowrank:8",
            "topk:64",
        ]
    )
    assert code == 0
    payload = json.loads(out.read_text())
    rules = [(row["rule"], row["batching"]) for row in payload["rule_rows"]]
    assert rules == [
        (rule, mode)
        for rule in ("max_prob", "cos_sim", "classifier", "lowrank:8", "topk:64")
        for mode in ("padded", "bucketed")
    ]
    by_rule = {row["rule"]: row for row in payload["rule_rows"]}
    assert by_rule["classifier"]["rule_macs_per_token"] == 32 and by_rule["lowrank:8"]["rule_macs_per_token"] == 8 * (
        32 + 256
    )
    assert by_rule["cos_sim"]["decision_share"] == 0.0 < by_rule["max_prob"]["decision_share"]
    assert all(row["exit_ratio"] == 0.5 and row["layer_cost"] == 0.75 for row in payload["rule_rows"])
    methods = [row["method"] for row in payload["rows"]]
    assert methods == ["full", "routed-padded", "routed-bucketed", "masked"]
    routed = payload["rows"][1]
    assert routed["exit_ratio"] == 0.5 and routed["layer_cost"] == 0.75
    assert payload["rows"][0]["flop_ratio"] == 1.0 and routed["flop_ratio"] < payload["rows"][3]["flop_ratio"]
    assert len(payload["checks"]) == 6 + 4  # + the classifier's two bars per batching mode
    for key in ("device", "dtype", "threads", "torch", "transformers", "git_commit", "seq_len", "data"):
        assert key in payload["conditions"]
    printed = capsys.readouterr().out
    assert "| hard ratio (set) | method | exit at stage 0 (measured) |" in printed and "routed-bucketed" in printed
    assert "| hard ratio (set) | exit rule | batching |" in printed
    quartiles = [row["wall_ratio_quartiles"] for row in payload["rows"] + payload["rule_rows"]]
    assert all(q1 == q3 for q1, q3 in quartiles)  # one repeat: both quartiles are its ratio
    assert payload["rows"][0]["wall_ratio_quartiles"] == [1.0, 1.0]


def test_bench_routing_profile_splits_each_pass_into_parts_that_add_up(tmp_path, capsys):
    code = main(
        [
            "bench-routing",
            "--preset",
            "gpt2-tiny",
            "--layers",
            "1",
            "1",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--profile",
            "--hard-ratios",
            "0.5",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--json",
            str(tmp_path / "bench.json"),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| method | stage | gather | layers | exit_head | exit_rule | exit other | scatter | stage other |" in out
    rows = json.loads((tmp_path / "bench.profile.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"full", "routed-padded", "routed-bucketed"}
    parts = ("gather", "layers", "exit_head", "exit_rule", "exit other", "scatter", "stage other")
    for method in ("full", "routed-padded", "routed-bucketed"):
        mine = {r["stage"]: r for r in rows if r["method"] == method}
        assert set(mine) == {"0", "1", "outside", "pass"}
        for k in ("0", "1"):
            assert sum(mine[k][p] for p in parts) == pytest.approx(mine[k]["total"])
            assert mine[k]["layers"] > 0 and 0 < mine[k]["layers share"] <= 1
        assert mine["0"]["total"] + mine["1"]["total"] + mine["outside"]["total"] == pytest.approx(
            mine["pass"]["total"]
        )
    # the last stage decides nothing: no confidence is computed there
    assert all(r["exit_rule"] == 0.0 for r in rows if r["stage"] == "1")


def test_bench_routing_names_a_bad_exit_rule(capsys):
    assert (
        main(["bench-routing", "--preset", "gpt2-tiny", "--layers", "1", "1", "--exit-rules", "max_prob", "lowrank"])
        == 2
    )
    assert "exit rule 'lowrank' needs a positive integer size" in capsys.readouterr().err


def test_bench_routing_rejects_a_single_stage(capsys):
    assert main(["bench-routing", "--layers", "4"]) == 2
    assert "early exit needs at least two stages, got 1" in capsys.readouterr().err


def test_bench_blocks_compares_blocks_with_the_unsplit_model(tmp_path, capsys):
    out = tmp_path / "blocks.json"
    code = main(
        [
            "bench-blocks",
            "--preset",
            "gpt2-tiny",
            "--layers",
            "1",
            "1",
            "1",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--hard-ratios",
            "1.0",
            "0.5",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["exit_rule"], r["hard_ratio"]) for r in rows] == [
        ("max_prob", 1.0),
        ("max_prob", 0.5),
        ("cos_sim", 1.0),
        ("cos_sim", 0.5),
    ]
    by = {(r["exit_rule"], r["hard_ratio"]): r for r in rows}
    # cos_sim with nobody exiting runs exactly the unsplit model (one head at the end); max_prob pays
    # the shared lm_head at every block on top of it.
    assert by[("cos_sim", 1.0)]["flop_ratio"] == 1.0 and by[("max_prob", 1.0)]["flop_ratio"] > 1.0
    # Thresholds are calibrated on a different batch: exits happen, not exactly half.
    assert 0 < by[("max_prob", 0.5)]["exit_ratios"][0] < 1 and by[("max_prob", 0.5)]["layer_cost"] < 1.0
    assert "| exit rule |" in capsys.readouterr().out


def test_cost_runs_on_a_saved_checkpoint_cut_into_blocks(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from cascade_bench.stages.presets import stage_config

    AutoModelForCausalLM.from_config(stage_config("llama-tiny", num_hidden_layers=4)).save_pretrained(tmp_path / "m")
    code = main(
        [
            "cost",
            "--model",
            str(tmp_path / "m"),
            "--boundaries",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--num-batches",
            "1",
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "cost.json"),
        ]
    )
    assert code == 0
    record = json.loads((tmp_path / "cost.json").read_text())
    assert record["flops"] == record["flops_analytic"] and [s["layers_in_stage"] for s in record["stages"]] == [2, 2]
    assert main(["cost", "--model", str(tmp_path / "m")]) == 2
    assert "--model and --boundaries go together" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["run"], ["cost"], ["bench-routing"], ["bench-blocks"], ["bench-generate"]])
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_an_unavailable_device_is_one_line_naming_it_for_every_command(command, device, capsys):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert main([*command, "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"device '{device}' is not available here" in err and "available: cpu" in err


def test_device_and_dtype_checks_name_what_is_wrong():
    from cascade_bench.measure.environment import check_device

    assert check_device("cpu", "bfloat16") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'gpu0' is not a device name"):
        check_device("gpu0")
    with pytest.raises(ValueError, match="dtype 'float33' is not a torch dtype"):
        check_device("cpu", "float33")


def test_every_command_of_the_parser_has_one_handler():
    import argparse

    from cascade_bench.cli import HANDLERS, build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(HANDLERS)


def test_an_exit_rule_is_spelled_exit_rule_on_every_command_and_the_old_spellings_are_gone(capsys):
    from cascade_bench.cli import build_parser

    parser = build_parser()
    for command in ("bench-routing", "bench-blocks", "bench-generate", "cost", "run"):
        assert parser.parse_args([command, "--exit-rule", "cos_sim"]).exit_rule == "cos_sim", command
    assert parser.parse_args(["bench-blocks", "--exit-rules", "max_prob", "margin"]).exit_rules == [
        "max_prob",
        "margin",
    ]
    assert parser.parse_args(["bench-generate", "--cost-of", "margin"]).rule == "margin"
    for old in (
        ["cost", "--exit-fn", "cos_sim"],
        ["bench-blocks", "--exit-fns", "max_prob"],
        ["bench-generate", "--rule", "margin"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(old)
        assert "unrecognized arguments" in capsys.readouterr().err


def test_cost_and_bench_commands_read_a_run_config_and_explicit_flags_win(tmp_path, capsys):
    from cascade_bench.cli import _with_run_config, build_parser

    configs = Path(__file__).resolve().parents[1] / "configs"
    parser = build_parser()
    for argv, expected in (
        (["bench-routing", "--config", str(configs / "default.toml")], ("gpt2-mini", [2, 2], 128, 8, "max_prob")),
        (
            ["bench-routing", "--config", str(configs / "default.toml"), "--seq-len", "64"],
            ("gpt2-mini", [2, 2], 64, 8, "max_prob"),
        ),
        (["cost", "--config", str(configs / "smoke.toml")], ("gpt2-tiny", [2, 2], 64, 8, "max_prob")),
    ):
        args = _with_run_config(parser, argv, parser.parse_args(argv))
        assert (args.preset, args.layers, args.seq_len, args.batch_size, args.exit_rule) == expected, argv
        parser = build_parser()  # set_defaults stays on the parser it was called on
    out = tmp_path / "cost.json"
    argv = ["cost", "--config", str(configs / "smoke.toml"), "--repeats", "1", "--num-batches", "1", "--no-fvcore"]
    assert main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["conditions"]["window"] == 64  # smoke.toml's seq_len, not the flag's 512
    capsys.readouterr()
    assert main(["bench-routing", "--config", str(configs / "smollm2.toml")]) == 2
    assert "has no preset stages" in capsys.readouterr().err


def test_bench_decode_and_train_draft_refuse_bad_paths_before_loading_a_model(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    cases = [
        (["bench-decode", "--draft", str(missing)], f"--draft {missing} is not a folder"),
        (["bench-decode", "--corpus", str(missing)], f"--corpus {missing} does not exist"),
        (["bench-decode", "--prompts", str(missing)], f"--prompts {missing} is not a file"),
        (["bench-decode", "--lookup", "-1"], "--lookup must be >= 0, got -1"),
        (["train-draft", "--out", str(tmp_path / "d"), "--corpus", str(missing)], f"--corpus {missing} does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-draft", "--out", str(tmp_path / "d"), "--layers", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_bench_decode_refuses_a_missing_model_folder_and_draft_methods_without_a_draft(tmp_path, capsys):
    assert main(["bench-decode", "--model", str(tmp_path / "nope")]) == 2
    assert "no such folder; expected a model folder, gguf:FILE or pypi:DISTRIBUTION" in capsys.readouterr().err
    assert main(["bench-decode", "--methods", "ours-draft"]) == 2
    assert "--methods ours-draft need a draft model: give --draft FOLDER" in capsys.readouterr().err


def test_bench_routing_drops_a_default_rule_that_does_not_fit_and_refuses_a_chosen_one(capsys):
    from cascade_bench.bench.choices import BENCH_RULES
    from cascade_bench.commands.routing_commands import _fitting_rules
    from tests.helpers import tiny_ensemble

    ensemble = tiny_ensemble("gpt2-tiny", layers=(1, 1))  # hidden size 32: lowrank:64 cannot run
    kept = _fitting_rules(list(BENCH_RULES), ensemble, chosen=False)
    assert "lowrank:64" in BENCH_RULES and "lowrank:64" not in kept and {"max_prob", "cos_sim"} <= set(kept)
    assert "note: the default exit rule 'lowrank:64' dropped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--exit-rules lowrank:64: .*choose a size that fits"):
        _fitting_rules(["lowrank:64"], ensemble, chosen=True)
