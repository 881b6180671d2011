"""Decode throughput of early-exit generation vs full-depth generation (tokens/s in extra_info).

    pytest benchmarks/test_generation_speed.py --benchmark-only

Exit ratios after stage 0 (0/50/90%) are forced with a seeded random exit rule (uniform
confidence, threshold 1 - ratio) that still computes stage 0's logits like ``max_prob``: greedy
text from these untrained stages is degenerate, so thresholds calibrated on text give decode exit
ratios far from the target. Each record also carries the routed run's decode time over the
full-depth run's, timed back to back.
"""

from __future__ import annotations

import pytest
import torch

from cascade_bench.corpus import byte_token_windows
from cascade_bench.exits import resolve_exit_function
from cascade_bench.generation import generate
from cascade_bench.timing import interleaved_ratio

NEW_TOKENS = 32
PROMPT = 64


class ForcedExitRate:
    """Uniform random confidence per token from a seeded generator: with threshold 1 - r, a
    fraction r exits. ``needs_logits=True`` makes stage 0's head run on every token (as for
    max_prob); False computes it only for the tokens that exit (as for cos_sim)."""

    needs_input_state = False

    def __init__(self, needs_logits: bool, seed: int = 0):
        self.needs_logits = needs_logits
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, h_in, h_out, logits):
        return torch.rand(h_out.shape[0], generator=self.generator).to(h_out.device)


@pytest.fixture(scope="module")
def decode_setup(bench_preset, cascades, text):
    cascade, _ = cascades
    prompts = {b: byte_token_windows(text, b, PROMPT).to(bench_preset.device) for b in (1, 8)}
    return cascade, prompts


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("exit_ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("head", ["head on every token", "head on exiting tokens"])
def test_decode_throughput(benchmark, bench_preset, decode_setup, batch, exit_ratio, head):
    cascade, prompts = decode_setup
    benchmark.group = f"decode, batch {batch}, {head}"
    ids = prompts[batch]
    original = cascade[0].exit_function
    cascade[0].exit_function = resolve_exit_function(ForcedExitRate(needs_logits=head == "head on every token"))

    def routed():
        return generate(cascade, ids, max_new_tokens=NEW_TOKENS, thresholds=[1.0 - exit_ratio])

    def full():
        return generate(cascade, ids, max_new_tokens=NEW_TOKENS, method="full")

    out = benchmark.pedantic(routed, rounds=3, warmup_rounds=1, iterations=1)
    reference = full()
    info = dict(tokens_per_s=1 / out.seconds_per_token, full_tokens_per_s=1 / reference.seconds_per_token,
                exit_counts=list(out.exit_counts), layer_cost=out.layer_cost, batch=batch, new_tokens=NEW_TOKENS,
                device=str(ids.device))
    if not benchmark.disabled:
        info["time_ratio_vs_full_back_to_back"] = interleaved_ratio(routed, full, pairs=2)
    benchmark.extra_info.update(info)
    cascade[0].exit_function = original
    decode_exit = out.exit_counts[0] / out.decode_tokens
    benchmark.extra_info["decode_exit_at_stage_0"] = decode_exit
    assert out.tokens.shape == (batch, NEW_TOKENS) and abs(decode_exit - exit_ratio) < 0.25
