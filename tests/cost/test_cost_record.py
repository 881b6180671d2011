"""measure_cost and the `cascade-bench cost` command."""

from __future__ import annotations

import json

from cascade_bench.cli import main
from cascade_bench.cost.measurement import measure_cost
from cascade_bench.cost.table import format_cost
from cascade_bench.routing.calibration import calibrate_thresholds
from tests.helpers import tiny_ensemble, token_batch


def test_measure_cost_puts_every_witness_in_one_record(text):
    ensemble = tiny_ensemble("gpt_neox-tiny")
    batches = [token_batch(text, 3, 32, offset=4000 * i) for i in range(2)]
    calibrate_thresholds(ensemble, batches, 0.5)
    record = measure_cost(
        ensemble, batches, repeats=2, batching="bucketed", conditions={"dataset": "pydoc topics", "window": 32}
    )
    assert record.flops == record.flops_analytic == record.flops_fvcore_matmul
    assert record.flops_fvcore > record.flops  # fvcore also counts layer_norm
    assert record.macs * 2 == record.flops
    assert sum(s.flops for s in record.stages) == record.flops
    for s in record.stages:
        assert s.flops == s.layers_flops + s.exit_head_flops + s.exit_rule_flops + s.other_flops
        assert s.analytic_flops == s.flops and 0 <= s.padding_flops < s.layers_flops
    # Calibrated at hard ratio 0.5: at most half continue (tied confidences exit).
    reached = record.stages[1].tokens_entered
    assert record.stages[0].tokens_entered == 192 and 85 <= reached <= 96
    assert reached == record.quality.tokens_entered[1] == record.stages[1].head_tokens
    assert record.quality.layer_cost == (192 * 2 + reached * 2) / (192 * 4)
    assert record.time_median_s > 0 and record.tokens_per_s > 0 and record.counting_overhead > 0
    assert {"stage0", "stage0.layers", "stage1.layers"} <= set(record.spans_median_s)
    assert record.peak_memory_bytes > 0 and record.memory_measure == "peak_live_tensor_bytes"
    assert record.host_syncs_per_forward is None  # CPU
    assert record.conditions["dataset"] == "pydoc topics" and record.conditions["timer"] == "perf_counter_ns"
    table = format_cost(record)
    assert "GFLOPs analytic" in table and f"| 1 | 2 | {reached} |" in table


def test_an_uncounted_record_on_a_timed_subset_says_so_and_keeps_quality_and_analytic_flops(text):
    from cascade_bench.routing.evaluation import evaluate

    ensemble = tiny_ensemble("gpt2-tiny")
    batches = [token_batch(text, 3, 32, offset=4000 * i) for i in range(3)]
    thresholds = calibrate_thresholds(ensemble, batches, 0.5)
    full = measure_cost(ensemble, batches, repeats=1, fvcore=False, spans=False, thresholds=thresholds)
    light = measure_cost(
        ensemble,
        batches,
        repeats=1,
        fvcore=False,
        spans=False,
        thresholds=thresholds,
        count_flops=False,
        timing_batches=1,
    )
    assert light.flops is None and light.macs is None and all(s.flops is None for s in light.stages)
    assert light.flops_analytic == full.flops_analytic == full.flops  # the analytic count covers every batch
    # ... and the timed batches' own count is what the wall time covers: the first batch alone here
    first = measure_cost(ensemble, batches[:1], repeats=1, fvcore=False, spans=False, thresholds=thresholds)
    assert light.flops_analytic_timed == first.flops_analytic < light.flops_analytic
    assert full.flops_analytic_timed == full.flops_analytic
    untimed = measure_cost(ensemble, batches, fvcore=False, spans=False, thresholds=thresholds, timed=False)
    assert untimed.flops_analytic_timed is None and untimed.flops_analytic == full.flops_analytic
    assert light.quality.nll_sum == full.quality.nll_sum == evaluate(ensemble, batches, thresholds=thresholds).nll_sum
    assert light.quality.tokens_entered == full.quality.tokens_entered
    assert (light.conditions["timed_batches"], light.conditions["timed_tokens"], light.conditions["batches"]) == (
        1,
        96,
        3,
    )
    assert light.conditions["flops_counted"] is False and full.conditions["timed_batches"] == 3
    assert light.tokens_per_s > 0 and "not counted" in format_cost(light)
    import pytest

    with pytest.raises(ValueError, match="timing_batches must be None .* got 0"):
        measure_cost(ensemble, batches, timing_batches=0)


def test_cost_command_on_a_preset_and_on_local_folders(tmp_path, capsys):
    out = tmp_path / "cost.json"
    args = [
        "cost",
        "--batch-size",
        "2",
        "--seq-len",
        "24",
        "--num-batches",
        "1",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
        str(out),
    ]
    assert main([*args, "--preset", "gpt2-tiny", "--layers", "1", "1", "--batching", "bucketed"]) == 0
    record = json.loads(out.read_text())
    assert record["flops"] == record["flops_analytic"] == record["flops_fvcore_matmul"]
    assert record["quality"]["conditions"]["calibrated_thresholds"]
    assert "| measure | value |" in capsys.readouterr().out

    ensemble = tiny_ensemble("llama-tiny")
    for k, stage in enumerate(ensemble):
        stage.model.save_pretrained(tmp_path / f"stage{k}")
    assert (
        main(
            [
                *args,
                "--stage",
                str(tmp_path / "stage0"),
                "--stage",
                str(tmp_path / "stage1"),
                "--no-fvcore",
                "--method",
                "masked",
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert record["method"] == "masked" and record["flops_fvcore"] is None
    assert record["quality"]["layer_cost"] == 1.0


def test_cost_command_errors_are_one_line(capsys, tmp_path):
    assert main(["cost", "--preset", "gpt2-tiny", "--layers", "2", "--json", str(tmp_path / "x.json")]) == 2
    assert "early exit needs at least two stages, got 1" in capsys.readouterr().err
