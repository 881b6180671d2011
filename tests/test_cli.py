"""The cascade-bench command line, end to end on tiny settings."""

from __future__ import annotations

import json

from cascade_bench.cli import main


def test_bench_routing_writes_rows_checks_and_conditions(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench-routing", "--preset", "gpt2-tiny", "--layers", "1", "1", "--batch-size", "2",
                 "--seq-len", "32", "--exit-ratios", "0.5", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    payload = json.loads(out.read_text())
    methods = [row["method"] for row in payload["rows"]]
    assert methods == ["full", "routed-padded", "routed-bucketed", "masked"]
    routed = payload["rows"][1]
    assert routed["exit_ratio"] == 0.5 and routed["layer_cost"] == 0.75
    assert payload["rows"][0]["flop_ratio"] == 1.0 and routed["flop_ratio"] < payload["rows"][3]["flop_ratio"]
    assert len(payload["checks"]) == 6
    for key in ("device", "dtype", "threads", "torch", "transformers", "git_commit", "seq_len", "data"):
        assert key in payload["conditions"]
    printed = capsys.readouterr().out
    assert "| forced exit | method |" in printed and "routed-bucketed" in printed


def test_bench_routing_rejects_a_single_stage(capsys):
    assert main(["bench-routing", "--layers", "4"]) == 2
    assert "early exit needs at least two stages, got 1" in capsys.readouterr().err
