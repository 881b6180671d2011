"""The decode-throughput benchmark: forced exit shares, what it reports, its checks and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cascade_bench.bench.generation import (CHUNK, ForcedExitRate, GenerationBenchRow, bench_generation, decode_checks,
                                            write_generation_bench)
from cascade_bench.cli import main
from cascade_bench.stages.exits import resolve_exit_function
from tests.helpers import tiny_ensemble, token_batch


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_forced_rate_exits_exactly_its_share_of_every_chunk(rate):
    rule = ForcedExitRate(rate, "cos_sim", seed=3)
    h = torch.randn(CHUNK, 4)
    decisions = torch.cat([rule(h, h, None) for _ in range(10)])
    per_chunk = decisions.view(10, CHUNK).sum(dim=1)
    # chunk j exits round(r*8*(j+1)) - round(r*8*j): the running total never drifts from r*n by 1 or more.
    assert int(decisions.sum()) == round(rate * CHUNK * 10)
    assert all(abs(float(per_chunk[: j + 1].sum()) - rate * CHUNK * (j + 1)) < 1 for j in range(10))
    assert set(decisions.tolist()) <= {0.0, 1.0}


def test_forced_rate_pays_the_rule_it_names_and_places_exits_by_seed():
    assert ForcedExitRate(0.5, "max_prob").needs_logits and not ForcedExitRate(0.5, "max_prob").needs_input_state
    assert ForcedExitRate(0.5, "cos_sim").needs_input_state and not ForcedExitRate(0.5, "cos_sim").needs_logits
    h = torch.randn(64, 4)
    first = ForcedExitRate(0.5, "cos_sim", seed=0)(h, h, None)
    assert torch.equal(first, ForcedExitRate(0.5, "cos_sim", seed=0)(h, h, None))
    assert not torch.equal(first, ForcedExitRate(0.5, "cos_sim", seed=1)(h, h, None))
    calls = []

    def spy(h_in, h_out, logits):
        calls.append(h_out.shape[0])
        return torch.zeros(h_out.shape[0])

    spy.needs_logits = False
    ForcedExitRate(0.5, resolve_exit_function(spy))(h, h, None)
    assert calls == [64]  # the named rule ran on every token


@pytest.mark.parametrize("rate", [-0.1, 1.5, True, "half"])
def test_forced_rate_rejects_what_is_not_a_fraction(rate):
    with pytest.raises(ValueError, match="rate must be a fraction in"):
        ForcedExitRate(rate)


def test_bench_generation_reports_the_forced_exit_share_and_its_layer_cost(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    original = ensemble[0].exit_function
    prompts = {1: token_batch(text, 1, 16), 4: token_batch(text, 4, 16)}
    rows, peers = bench_generation(ensemble, prompts, rates=(0.0, 0.5, 1.0), rules=("max_prob",), new_tokens=9,
                                   repeats=1, warmup=0)
    assert ensemble[0].exit_function is original
    assert [(r.batch_size, r.forced_rate) for r in rows] == [(b, r) for b in (1, 4) for r in (0.0, 0.5, 1.0)]
    for r in rows:
        # 16-token prompts and 8 decode steps use whole chunks, so the decode share is exact; two equal
        # stages: layer cost = (all tokens x 2 layers + continuing x 2 layers) / (all x 4) = 1 - rate / 2.
        assert r.decode_exit_ratio == r.forced_rate
        assert r.layer_cost == pytest.approx(1 - r.forced_rate / 2)
        assert r.speedup > 0 and r.tokens_per_s == pytest.approx(1 / r.seconds_per_token)
    assert [p.batch_size for p in peers] == [1, 4] and all(p.seconds_per_token_hf > 0 for p in peers)


def test_blocks_get_the_benchmark_without_the_hf_peer(text):
    ensemble = tiny_ensemble("llama-tiny", kind="block")
    rows, peers = bench_generation(ensemble, {2: token_batch(text, 2, 8)}, rates=(0.5,), rules=("cos_sim",),
                                   new_tokens=5, repeats=1, warmup=0)
    assert len(rows) == 1 and rows[0].decode_exit_ratio == 0.5 and peers == []


def test_bench_generation_rejects_bad_arguments(text):
    ensemble = tiny_ensemble("gpt2-tiny")
    prompts = {1: token_batch(text, 1, 8)}
    with pytest.raises(ValueError, match="new_tokens must be an int >= 2"):
        bench_generation(ensemble, prompts, new_tokens=1)
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        bench_generation(ensemble, prompts, repeats=0)
    with pytest.raises(ValueError, match="at least 2 stages, got 1"):
        bench_generation(tiny_ensemble("gpt2-tiny", layers=(2,)), prompts)


def test_decode_checks_compare_the_batch_1_half_exit_rows_with_the_bar(tmp_path):
    def row(batch, rate, speedup, rule="cos_sim"):
        return GenerationBenchRow(batch, rule, rate, rate, 1 - rate / 2, 1.0, speedup, speedup)

    rows = [row(1, 0.5, 1.3), row(1, 0.5, 1.1, "max_prob"), row(8, 0.5, 2.0), row(1, 0.9, 2.0)]
    checks = decode_checks(rows)
    assert [met for _, met in checks] == [True, False]
    assert "cos_sim cost: decode speedup 1.300 >= 1.25" in checks[0][0]
    write_generation_bench(rows, [], checks, {"device": "cpu"}, tmp_path / "g.json")
    stored = json.loads((tmp_path / "g.json").read_text())
    assert [c["met"] for c in stored["checks"]] == [True, False] and stored["rows"][0]["tokens_per_s"] == 1.0


def test_bench_generate_command_prints_and_stores_the_table(tmp_path, capsys):
    out = tmp_path / "generate.json"
    code = main(["bench-generate", "--preset", "gpt2-tiny", "--layers", "1", "1", "--batch-sizes", "1", "2",
                 "--exit-ratios", "0.5", "--rules", "cos_sim", "--prompt-len", "8", "--new-tokens", "9",
                 "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    stored = json.loads(out.read_text())
    assert [(r["batch_size"], r["decode_exit_ratio"]) for r in stored["rows"]] == [(1, 0.5), (2, 0.5)]
    assert len(stored["hf_peer"]) == 2 and len(stored["checks"]) == 1
    printed = capsys.readouterr().out
    assert "| batch | exit rule cost |" in printed and "HF generate, stage 0" in printed
    assert math.isfinite(stored["rows"][0]["speedup"])


def test_bench_generate_command_names_a_bad_new_tokens(capsys):
    assert main(["bench-generate", "--preset", "gpt2-tiny", "--new-tokens", "1"]) == 2
    assert "--new-tokens must be at least 2" in capsys.readouterr().err
