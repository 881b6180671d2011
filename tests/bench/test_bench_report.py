"""`cascade-bench bench-report`: pytest-benchmark JSON to tables and a plot."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cascade_bench.bench.report import benchmark_frame
from cascade_bench.cli import main


def _bench(params, median, flop_ratio, exit0, shape=(8, 512)):
    return {
        "name": "x",
        "params": params,
        "stats": {"median": median, "iqr": 0.01, "rounds": 5},
        "extra_info": {
            "flop_ratio": flop_ratio,
            "layer_cost": 1 - exit0 / 2,
            "exit_ratios": [exit0, 1 - exit0],
            "ppl": 100.0,
            "tokens": 4096,
            "batch_shape": list(shape),
            "device": "cpu",
            "dtype": "float32",
        },
    }


@pytest.fixture
def bench_json(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps(
            {
                "benchmarks": [
                    _bench({"baseline": "full", "shape_index": 0}, 0.50, 1.0, 0.0),
                    _bench({"method": "routed-padded", "hard_ratio": 0.5, "shape_index": 0}, 0.45, 0.90, 0.5),
                    _bench({"method": "masked", "hard_ratio": 0.5, "shape_index": 0}, 0.60, 1.20, 0.5),
                    {
                        "name": "test_stage0_training_throughput",
                        "params": None,
                        "stats": {"median": 2.0, "iqr": 0, "rounds": 1},
                        "extra_info": {"tokens_per_s": 5000},
                    },
                ]
            }
        )
    )
    return path


def test_frame_ratios_by_hand(bench_json):
    frame = benchmark_frame(bench_json)
    assert list(frame.method) == ["full", "masked", "routed-padded"]
    routed = frame[frame.method == "routed-padded"].iloc[0]
    assert routed["wall ratio"] == pytest.approx(0.45 / 0.50)
    assert routed["wall/FLOP"] == pytest.approx(0.9 / 0.9)
    assert frame[frame.method == "masked"].iloc[0]["wall ratio"] == pytest.approx(1.2)


def test_command_writes_tables_and_plot(bench_json, tmp_path, capsys):
    assert main(["bench-report", str(bench_json), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "run.benchmarks.csv")
    assert len(table) == 3 and "wall/FLOP" in table.columns
    assert (tmp_path / "out" / "run.cost_vs_time.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out
    assert main(["bench-report", str(tmp_path / "missing.json")]) == 2
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    assert main(["bench-report", str(empty)]) == 2
    assert "no routing benchmarks" in capsys.readouterr().err


def test_benchmarks_recorded_with_the_old_exit_ratio_parameter_read_as_hard_ratios(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(
        json.dumps(
            {
                "benchmarks": [
                    _bench({"method": "full", "shape_index": 0}, 1.0, 1.0, 0.0),
                    _bench({"method": "routed-padded", "exit_ratio": 0.25, "shape_index": 0}, 0.8, 0.9, 0.25),
                ]
            }
        )
    )
    with pytest.warns(FutureWarning, match="read as hard_ratio = 1 - exit_ratio"):
        frame = benchmark_frame(path)
    assert frame[frame.method == "routed-padded"]["hard ratio"].tolist() == [0.75]
