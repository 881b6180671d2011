"""Decode throughput of early-exit generation vs full-depth generation (tokens/s in extra_info).

    pytest benchmarks/test_generation_speed.py --benchmark-only

Exit ratios after stage 0 (0/50/90%) are forced exactly by ``ForcedExitRate`` at the cost of a
real rule (max_prob: stage 0's head on every token; cos_sim: the last layer's input captured, the
head only on exiting tokens): greedy text from untrained stages is degenerate, so thresholds
calibrated on text give decode exit ratios far from the target. Each record also carries the
decode speedup over full depth, median of back-to-back pairs; ``cascade-bench bench-generate``
prints the same comparison as one table.
"""

from __future__ import annotations

import statistics

import pytest

from cascade_bench.bench.forced_exits import ForcedExitRate
from cascade_bench.data.corpus import byte_token_windows
from cascade_bench.routing.generation import generate
from cascade_bench.stages.exits import resolve_exit_rule

NEW_TOKENS = 33  # 32 decode steps
PROMPT = 64


@pytest.fixture(scope="module")
def decode_setup(bench_preset, cascades, text):
    cascade, _ = cascades
    prompts = {b: byte_token_windows(text, b, PROMPT).to(bench_preset.device) for b in (1, 8)}
    return cascade, prompts


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("hard_ratio", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("rule", ["max_prob", "cos_sim"])
def test_decode_throughput(benchmark, bench_preset, decode_setup, batch, hard_ratio, rule):
    cascade, prompts = decode_setup
    benchmark.group = f"decode, batch {batch}, {rule} cost"
    ids = prompts[batch]
    original = cascade[0].exit_rule
    cascade[0].exit_rule = resolve_exit_rule(ForcedExitRate(1 - hard_ratio, rule))
    try:

        def routed():
            return generate(cascade, ids, max_new_tokens=NEW_TOKENS, thresholds=[0.5])

        def full():
            return generate(cascade, ids, max_new_tokens=NEW_TOKENS, method="full")

        out = benchmark.pedantic(routed, rounds=3, warmup_rounds=1, iterations=1)
        info = dict(
            tokens_per_s=1 / out.seconds_per_token,
            exit_counts=list(out.exit_counts),
            layer_cost=out.layer_cost,
            batch=batch,
            new_tokens=NEW_TOKENS,
            device=str(ids.device),
            decode_exit_at_stage_0=out.exit_counts[0] / out.decode_tokens,
        )
        if not benchmark.disabled:
            pairs = [(routed().seconds_per_token, full().seconds_per_token) for _ in range(3)]
            info["full_tokens_per_s"] = 1 / statistics.median(f for _, f in pairs)
            info["decode_speedup_vs_full_back_to_back"] = statistics.median(f / r for r, f in pairs)
        benchmark.extra_info.update(info)
    finally:
        cascade[0].exit_rule = original
    # The forced running total stays within one decision of rate x decisions, so any window of them
    # (here the decode steps after the prompt's) is within two.
    assert out.tokens.shape == (batch, NEW_TOKENS)
    assert abs(info["decode_exit_at_stage_0"] - (1 - hard_ratio)) < 2 / out.decode_tokens


def _policy_run(cascade, ids, policy: str):
    """One decode under ``policy`` at 50% of tokens (or steps) leaving after stage 0."""
    from cascade_bench.bench.decoding import ForcedStepExit
    from cascade_bench.routing.speculative import self_speculative_generate

    stages = len(cascade)
    if policy == "self-speculative":
        return lambda: self_speculative_generate(cascade, ids, max_new_tokens=NEW_TOKENS, draft_length=4)
    if policy == "schedule":
        schedule = [stages - 1] * ((NEW_TOKENS - 1) // 2) + [0]
        return lambda: generate(cascade, ids, max_new_tokens=NEW_TOKENS, exit_policy="schedule", exit_schedule=schedule)
    if policy == "batch":
        cascade[0].exit_rule = resolve_exit_rule(ForcedStepExit(0.5, "cos_sim"))
        return lambda: generate(cascade, ids, max_new_tokens=NEW_TOKENS, thresholds=[0.5], exit_policy="batch")
    kv = policy.split(":")[1]
    cascade[0].exit_rule = resolve_exit_rule(ForcedExitRate(0.5, "cos_sim"))
    return lambda: generate(cascade, ids, max_new_tokens=NEW_TOKENS, thresholds=[0.5], kv_policy=kv)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize(
    "policy",
    ["per_token:absent", "per_token:propagate", "per_token:recompute", "batch", "schedule", "self-speculative"],
)
def test_decode_policy_throughput(benchmark, decode_setup, batch, policy):
    """Each decoding policy at 50% exit after stage 0 (cos_sim cost), with its speedup over full
    depth from back-to-back pairs (``cascade-bench bench-generate`` has the quality columns)."""
    cascade, prompts = decode_setup
    benchmark.group = f"decode policies, batch {batch}"
    ids = prompts[batch]
    original = cascade[0].exit_rule
    try:
        run = _policy_run(cascade, ids, policy)
        out = benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
        info = dict(tokens_per_s=1 / out.seconds_per_token, batch=batch, new_tokens=NEW_TOKENS, policy=policy)
        if not benchmark.disabled:

            def full():
                return generate(cascade, ids, max_new_tokens=NEW_TOKENS, method="full")

            pairs = [(run().seconds_per_token, full().seconds_per_token) for _ in range(5)]
            info["decode_speedup_vs_full_back_to_back"] = statistics.median(f / r for r, f in pairs)
        benchmark.extra_info.update(info)
    finally:
        cascade[0].exit_rule = original
    assert out.tokens.shape == (batch, NEW_TOKENS)
    if policy == "self-speculative":  # lossless: the full-depth greedy tokens
        assert out.tokens.equal(generate(cascade, ids, max_new_tokens=NEW_TOKENS, method="full").tokens)
