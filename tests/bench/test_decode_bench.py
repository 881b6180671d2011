"""``train-draft`` and ``bench-decode`` end to end on a tiny Llama the test writes itself (as a GGUF
file, converted like a real model): the draft is a plain Hugging Face folder, and every lossless
method, ours and Hugging Face's, produces its implementation's greedy tokens."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")

from cascade_bench.bench.decode_suite import BATCH_ONE_ONLY, METHODS, PLAIN  # noqa: E402
from cascade_bench.cli import main  # noqa: E402
from tests.stages.test_model_source import write_tiny_llama_gguf  # noqa: E402


def _mlp_exits(models, path, recipe_name="mlp"):
    """An exits file for the converted tiny model at its default draft layer (2 of 3), with weights
    that are not the identity (random, as training would leave them), written as `train-exits` does."""
    import torch
    from transformers import AutoModelForCausalLM

    from cascade_bench.stages.blocks import Translator
    from cascade_bench.training.exit_recipes import build_recipe
    from cascade_bench.training.saved_exits import save_exits

    (config,) = list(models.rglob("config.json"))
    model = AutoModelForCausalLM.from_pretrained(config.parent)
    recipe = build_recipe(recipe_name, model, [2], {2: Translator(model.config.hidden_size)})
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in recipe.exits.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return save_exits(recipe, path, "tiny")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    gguf = root / "tiny-llama.F32.gguf"
    write_tiny_llama_gguf(gguf, layers=3)
    models = root / "models"
    draft = root / "draft"
    common = ["--model", f"gguf:{gguf}", "--models-dir", str(models)]
    assert (
        main(
            [
                "train-draft",
                *common,
                "--out",
                str(draft),
                "--layers",
                "1",
                "--teacher-tokens",
                "2048",
                "--validation-tokens",
                "512",
                "--window",
                "32",
                "--steps-per-check",
                "2",
                "--patience",
                "1",
                "--seconds",
                "60",
                "--vocabulary",
                "64",
                "--quiet",
            ]
        )
        == 0
    )
    exits = _mlp_exits(models, root / "tiny.exits" / "mlp.pt")
    out = root / "bench.json"
    assert (
        main(
            [
                "bench-decode",
                *common,
                "--draft",
                str(draft),
                "--exits",
                str(exits),
                "--self-spec-length",
                "3",
                "--per-set",
                "2",
                "--batch-sizes",
                "1",
                "2",
                "--new-tokens",
                "6",
                "--sets",
                "documentation",
                "code",
                "--early-exit-prompts",
                "1",
                "--json",
                str(out),
                "--markdown",
                str(root / "bench.md"),
                "--quiet",
            ]
        )
        == 0
    )
    return draft, json.loads(out.read_text()), (root / "bench.md").read_text(), out, models


def test_the_draft_is_a_plain_hugging_face_folder_with_its_record(bench):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    draft, _, _, _, _ = bench
    model = AutoModelForCausalLM.from_pretrained(draft)
    assert model.config.num_hidden_layers == 1
    AutoTokenizer.from_pretrained(draft)
    record = json.loads((draft / "draft.json").read_text())
    assert record["config"]["layers"] == 1 and len(record["vocabulary"]) == 64
    training = record["training"]
    assert 0.0 <= training["start_agreement"] <= 1.0 and training["stop_reason"] in ("early stopping", "time budget")
    assert training["best_agreement"] == max(training["val_agreement"])


def test_every_method_is_measured_where_it_can_run_and_lossless_rows_match_plain_greedy(bench):
    _, payload, markdown, _, _ = bench
    rows = [r for r in payload["rows"] if r["prompt_set"] != "all"]
    required = {
        "method",
        "batch_size",
        "prompt_set",
        "tokens_per_s",
        "speedup",
        "same_tokens",
        "acceptance",
        "realisation",
        "baseline",
    }
    assert all(required <= set(row) for row in rows)
    for batch in (1, 2):
        for prompt_set in ("documentation", "code"):
            got = {r["method"] for r in rows if r["batch_size"] == batch and r["prompt_set"] == prompt_set}
            expected = set(METHODS) if batch == 1 else set(METHODS) - set(BATCH_ONE_ONLY)
            assert got == expected
    for row in rows:
        assert row["baseline"] in PLAIN
        if row["lossless"]:
            assert row["same_tokens"] == 1.0, row["method"]
        else:
            assert row["method"] == "ours-lossy" and 0.0 <= row["same_tokens"] <= 1.0
        if row["method"] in ("ours-greedy", "ours-lossy"):
            assert row["continuation_nll"] > 0  # the real model's NLL of the produced tokens
        if row["method"] == row["baseline"]:
            assert row["speedup"] == 1.0
        if row["method"].startswith("ours-") and row["method"] not in PLAIN:
            assert 0.0 <= row["acceptance"] <= 1.0 or row["acceptance"] != row["acceptance"]
            assert row["realisation"] > 0
    notes = payload["conditions"]["notes"]
    assert any("hf-assisted at batch 2" in note for note in notes)
    assert "### Batch 1" in markdown and "### Batch 2" in markdown


def test_whole_suite_rows_are_written_and_rewritten_from_the_json_alone(bench, tmp_path):
    _, payload, _, path, _ = bench
    suite = [r for r in payload["rows"] if r["prompt_set"] == "all"]
    assert {(r["method"], r["batch_size"]) for r in suite} == {
        (r["method"], r["batch_size"]) for r in payload["rows"] if r["prompt_set"] == "code"
    }
    copy = tmp_path / "copy.json"
    copy.write_text(path.read_text())
    assert main(["bench-decode", "--tables-from", str(copy), "--markdown", str(tmp_path / "t.md"), "--quiet"]) == 0
    assert copy.read_text() == path.read_text()  # nothing re-measured, the same rows recomputed
    assert "| ours-greedy | all |" in (tmp_path / "t.md").read_text()


def test_early_exit_methods_are_capped_at_batch_one_and_the_run_records_where_its_time_went(bench):
    _, payload, _, _, _ = bench
    for row in payload["rows"]:
        if row["prompt_set"] == "all":
            continue
        capped = row["batch_size"] == 1 and row["method"] in (
            "ours-self-spec",
            "ours-self-spec-trained",
            "hf-early-exit",
        )
        assert row["prompts"] == (1 if capped else 2), (row["method"], row["batch_size"])
        assert len(row["per_prompt_seconds"]) * row["batch_size"] == row["prompts"]  # one entry per call
    phases = payload["conditions"]["phase_seconds"]
    assert {"prompt_suite", "loading", "floor", "calibration", "warm_up", "flop_counting", "timed"} <= set(phases)
    assert all(seconds > 0 for seconds in phases.values())
    # the timed calls' own seconds are part of the timed phase
    timed = sum(sum(r["per_prompt_seconds"]) for r in payload["rows"] if r["prompt_set"] != "all")
    assert timed <= phases["timed"]


def test_a_two_layer_gpt2_gets_a_default_draft_layer_inside_it_and_no_call_known_to_fail(tmp_path):
    """The default early-exit layer (80% of the depth) stays inside a 2-layer model, and Hugging
    Face's assistant_early_exit, which fails on GPT-2, is not called: the run's notes say why."""
    from transformers import AutoModelForCausalLM

    from cascade_bench.bench.decode_run import run_decode_bench
    from cascade_bench.data.corpus import embedded_corpus
    from cascade_bench.data.tokenization import load_tokenizer
    from cascade_bench.stages.presets import stage_config

    folder = tmp_path / "gpt2"
    load_tokenizer("bpe:300", embedded_corpus().documents("train"), cache_dir=tmp_path / "cache").save_pretrained(
        folder
    )
    AutoModelForCausalLM.from_config(stage_config("gpt2-tiny", vocab_size=300)).save_pretrained(folder)
    rows, conditions = run_decode_bench(
        str(folder),
        "tiny gpt2",
        per_set=1,
        sets=["documentation"],
        batch_sizes=[1],
        new_tokens=3,
        methods=["ours-self-spec", "hf-early-exit"],
        count_flops=False,
        progress=False,
    )
    assert conditions["early_exit_layer"] == 1
    assert {r.method for r in rows} == {"ours-greedy", "hf-greedy", "ours-self-spec"}
    assert any(
        note.startswith("hf-early-exit not run: transformers' assistant_early_exit fails on GPT-2")
        for note in conditions["notes"]
    )


def test_the_trained_exit_drafts_exactly_greedy_text_and_the_record_names_it(bench):
    _, payload, _, _, _ = bench
    trained = [r for r in payload["rows"] if r["method"] == "ours-self-spec-trained" and r["prompt_set"] != "all"]
    assert {r["batch_size"] for r in trained} == {1, 2}
    assert all(r["same_tokens"] == 1.0 and r["lossless"] for r in trained)
    assert payload["conditions"]["exits"]["recipe"] == "mlp" and payload["conditions"]["self_spec_draft_length"] == 3
    assert payload["conditions"]["exits"]["file"].endswith("tiny.exits/mlp.pt")
    assert payload["conditions"]["exits"]["trained_on"] == "tiny"


def test_exits_that_need_a_cache_or_are_missing_are_refused_before_the_run(bench, tmp_path, capsys):
    _, _, _, _, models = bench
    (gguf,) = list(models.parent.glob("*.gguf"))
    common = ["bench-decode", "--model", f"gguf:{gguf}", "--models-dir", str(models), "--quiet"]
    common += ["--per-set", "1", "--sets", "code", "--batch-sizes", "1", "--new-tokens", "2", "--no-flops"]
    adapter = _mlp_exits(models, tmp_path / "adapter.pt", recipe_name="adapter")
    exits = _mlp_exits(models, tmp_path / "mlp.pt")
    for extra, message in (
        (["--exits", str(adapter)], "holds 'adapter' exits; self-speculative decoding takes exits that read one"),
        (["--methods", "ours-self-spec-trained"], "ours-self-spec-trained: needs trained exits: give --exits FILE"),
        (["--exits", str(tmp_path / "missing.pt")], "missing.pt: no such file"),
        (
            ["--exits", str(exits), "--early-exit-layer", "1"],
            "not at the draft layer 1: pass --early-exit-layer one of [2]",
        ),
    ):
        capsys.readouterr()
        assert main([*common, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra


def test_tables_from_re_predicts_from_the_measured_terms(bench, tmp_path):
    """A record whose self-speculation rows were predicted with a round yielding k + 1 tokens (as
    before the formula was corrected) gets the k-token prediction back, and the measured speedup
    over our greedy (realisation x predicted) is kept."""
    from cascade_bench.bench.decode_suite import predicted_speedup

    _, payload, _, _, _ = bench
    old = json.loads(json.dumps(payload))
    measured = {}
    for row in old["rows"]:
        if row["method"] == "ours-self-spec" and row["prompt_set"] != "all":
            a = (
                row["acceptance_per_position"]
                if row["acceptance_per_position"] == row["acceptance_per_position"]
                else 0
            )
            terms = (a, row["proposals_per_round"], row["draft_cost"], row["draft_calls_per_round"], row["verify_cost"])
            measured[(row["batch_size"], row["prompt_set"])] = row["realisation"] * row["predicted_speedup"]
            row["predicted_speedup"] = predicted_speedup(*terms, bonus=True)
            row["realisation"] = measured[(row["batch_size"], row["prompt_set"])] / row["predicted_speedup"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert main(["bench-decode", "--tables-from", str(path), "--markdown", str(tmp_path / "t.md"), "--quiet"]) == 0
    for row in json.loads(path.read_text())["rows"]:
        if (row["batch_size"], row["prompt_set"]) in measured and row["method"] == "ours-self-spec":
            a = (
                row["acceptance_per_position"]
                if row["acceptance_per_position"] == row["acceptance_per_position"]
                else 0
            )
            terms = (a, row["proposals_per_round"], row["draft_cost"], row["draft_calls_per_round"], row["verify_cost"])
            assert row["predicted_speedup"] == pytest.approx(predicted_speedup(*terms, bonus=False))
            assert row["realisation"] * row["predicted_speedup"] == pytest.approx(
                measured[(row["batch_size"], row["prompt_set"])]
            )
