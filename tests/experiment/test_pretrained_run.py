"""``cascade-bench run`` on a pretrained model from a GGUF file, end to end, on a tiny Llama the
test writes itself: conversion, the exit study (shared head at every layer, translators at the
candidates), blocks with translator heads, the sweep, the report, and the saved cascade that
bench-generate and lm-eval load from the run's config."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")

from cascade_bench.experiment.config import make_config  # noqa: E402
from cascade_bench.experiment.exit_study import auto_boundaries  # noqa: E402
from cascade_bench.experiment.pipeline import run_experiment, saved_cascade  # noqa: E402
from tests.stages.test_model_source import write_tiny_llama_gguf  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    gguf = root / "tiny-llama.F32.gguf"
    write_tiny_llama_gguf(gguf, layers=4)
    config = make_config(
        {
            "name": "tiny-gguf",
            "model": f"gguf:{gguf}",
            "tokenizer": "model",
            "seq_len": 32,
            "eval_stride": 16,
            "batch_size": 4,
            "eval_batches": 1,
            "validation_batches": 1,
            "exit_layers": [1, 2, 3],
            "boundaries": [2],
            "block_heads": "translator",
            "exit_train_tokens": 512,
            "exit_rules": ["max_prob", "cos_sim"],
            "hard_ratios": [0.3, 0.5],
            "kv_policies": [],
            "risk": "",
            "timing_repeats": 1,
            "timing_batches": 1,
            "timing_points": "anchors",
            "baselines": ["full", "prefix", "masked", "oracle"],
            "out": str(root),
            "plausible_ppl": [1, 1e6],
        }
    )
    paths = run_experiment(config, progress=False)
    return config, paths


def test_the_exit_study_covers_every_layer_and_candidate(run):
    config, paths = run
    study = json.loads(paths["exit_study"].read_text())
    assert [p["layer"] for p in study["shared_curve"]] == [1, 2, 3]
    assert [r["layer"] for r in study["candidate_rows"]] == [1, 2, 3]
    assert study["source"]["quantisation"] == "F32" and "dequantised" in study["source"]["note"]
    assert study["translators"]["train_tokens"] == 512 and study["translators"]["split"] == "train"
    needed = study["layers_needed"]
    assert 1 <= needed["shared"]["first_agreement"] <= needed["shared"]["settled"] <= 4
    assert (paths["tables"] / "tiny-gguf.exit_curve.md").is_file()
    assert (paths["plots"] / "tiny-gguf.exit_curve.png").is_file()


def test_the_sweep_counts_what_it_runs_and_times_the_anchors_only(run):
    config, paths = run
    records = {r["point_id"]: r for r in map(json.loads, paths["results"].read_text().splitlines())}
    assert {"full", "prefix-0", "routed@0.5", "masked@0.3", "routed[cos_sim]@0.3", "oracle"} <= set(records)
    for record in records.values():
        if record.get("flops") is not None:
            assert record["flops"] == record["flops_analytic"]  # translator matmuls included
    assert records["routed@0.5"]["time_median_s"] > 0 and "wall_ratio_interleaved" in records["routed@0.5"]
    assert (
        records["routed@0.3"]["conditions"]["timed"] is False and "wall_ratio_interleaved" not in records["routed@0.3"]
    )
    assert records["full"]["conditions"]["training"]["block_heads"] == "translator"
    report = paths["report"].read_text()
    assert "## Where could this model exit?" in report and "not the original float checkpoint" in report


def test_the_saved_cascade_is_found_from_the_runs_config(run, tmp_path):
    from cascade_bench.training.persistence import load_ensemble

    config, paths = run
    toml = tmp_path / "run.toml"
    toml.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in config.as_dict().items()) + "\n")
    folder = saved_cascade(toml)
    assert folder == paths["models"] / "cascade"
    cascade = load_ensemble(folder)
    assert cascade.layers_per_stage == (2, 2) and cascade[0].head.translator is not None
    assert cascade.thresholds[0] < float("inf")  # saved at the anchor's calibrated thresholds


def test_auto_boundaries_read_the_validation_agreement():
    curve = [{"layer": 6, "agreement": 0.3}, {"layer": 12, "agreement": 0.55}, {"layer": 18, "agreement": 0.8}]
    assert auto_boundaries([0.5], curve) == [12]
    assert auto_boundaries([0.5, 0.75], curve) == [12, 18]
    with pytest.raises(ValueError, match="best 0.800"):
        auto_boundaries([0.9], curve)
    with pytest.raises(ValueError, match="not distinct"):
        auto_boundaries([0.6, 0.7], curve)
