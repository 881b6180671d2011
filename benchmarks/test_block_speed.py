"""Early exit inside one model: blocks (12 layers split 4/4/4 on the CPU preset; GPT-2-small size
on the gpu preset) against the unsplit model, for a logit-based exit rule (max_prob: the shared
lm_head runs on every token reaching a block) and a logit-free one (cos_sim: the head runs only
for the tokens leaving a block).

    pytest benchmarks/test_block_speed.py --benchmark-only
    cascade-bench bench-blocks              # the same comparison, all ratios from one interleaved run

``extra_info``: counted FLOPs, FLOP ratio to the unsplit model, exit-head FLOPs, layer cost,
exit ratio per block, and the wall ratio to the unsplit model timed back to back.
"""

from __future__ import annotations

import pytest
import torch

from cascade_bench.data.corpus import byte_token_windows
from cascade_bench.measure.flops import count_flops, count_pass_flops
from cascade_bench.measure.timing import interleaved_ratio, synchronize
from cascade_bench.routing.calibration import calibrate_thresholds
from cascade_bench.routing.passes import forward_cascade
from cascade_bench.stages.exits import resolve_exit_rule

HARD_RATIOS = (0.75, 0.5, 0.25)


@pytest.fixture(scope="module")
def block_batch(bench_preset, blocks, text):
    """(measured ids, calibration ids, counted FLOPs of the unsplit model)."""
    shape = bench_preset.shapes[0]
    windows = byte_token_windows(text, 2 * shape[0], shape[1]).to(bench_preset.device)
    ids, calibration = windows[: shape[0]], windows[shape[0] :]
    with torch.inference_mode():
        unsplit_flops = count_flops(forward_cascade, blocks, ids, method="full")[0].flops
        hf_flops = count_flops(blocks[0].source, input_ids=ids)[0].flops
    assert unsplit_flops == hf_flops  # "full" on the blocks is the unsplit model, matmul for matmul
    return ids, calibration, unsplit_flops


def _forward(ensemble, ids, device, **kwargs):
    def forward():
        with torch.inference_mode():
            out = forward_cascade(ensemble, ids, **kwargs)
        synchronize(device)
        return out

    return forward


def test_unsplit_model(benchmark, bench_preset, blocks, block_batch):
    ids, _, unsplit_flops = block_batch
    benchmark.group = f"blocks {'/'.join(map(str, bench_preset.block_layers))}, {tuple(ids.shape)}"
    out = benchmark.pedantic(_forward(blocks, ids, bench_preset.device, method="full"), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(
        counted_flops=unsplit_flops,
        flop_ratio=1.0,
        layer_cost=out.layer_cost,
        exit_ratios=list(out.exit_ratios),
        tokens=out.num_tokens,
    )
    assert out.layer_cost == 1.0


@pytest.mark.parametrize("hard_ratio", HARD_RATIOS)
@pytest.mark.parametrize("exit_rule", ["max_prob", "cos_sim"])
def test_routed_blocks(benchmark, bench_preset, blocks, block_batch, exit_rule, hard_ratio):
    ids, calibration, unsplit_flops = block_batch
    benchmark.group = f"blocks {'/'.join(map(str, bench_preset.block_layers))}, {tuple(ids.shape)}"
    saved = [(b.exit_rule, b.threshold) for b in blocks]
    try:
        for block in blocks:
            block.exit_rule = resolve_exit_rule(exit_rule)
        thresholds = list(calibrate_thresholds(blocks, [calibration], hard_ratio))
        routed = _forward(blocks, ids, bench_preset.device, thresholds=thresholds)
        out = benchmark.pedantic(routed, rounds=5, warmup_rounds=1)
        with torch.inference_mode():
            counted, _ = count_pass_flops(
                lambda probe: forward_cascade(blocks, ids, thresholds=thresholds, probe=probe), len(blocks)
            )
        if not benchmark.disabled:
            unsplit = _forward(blocks, ids, bench_preset.device, method="full")
            benchmark.extra_info["wall_ratio_interleaved"] = interleaved_ratio(routed, unsplit, pairs=2)
    finally:
        for block, (fn, threshold) in zip(blocks, saved):
            block.exit_rule, block.threshold = fn, threshold
    heads = sum(s.exit_head + s.exit_rule for s in counted.stages)
    benchmark.extra_info.update(
        counted_flops=counted.total,
        flop_ratio=counted.total / unsplit_flops,
        exit_head_flops=heads,
        layer_cost=out.layer_cost,
        exit_ratios=list(out.exit_ratios),
        tokens=out.num_tokens,
        exit_rule=exit_rule,
        hard_ratio=hard_ratio,
    )
    assert out.tokens_entered[1] < out.tokens_entered[0] and out.layer_cost < 1.0
    if exit_rule == "cos_sim":  # logit-free: each token's head runs once, at the block it leaves
        assert sum(out.head_tokens) == out.num_tokens
    else:  # every token reaching a non-last block pays the head there
        assert sum(out.head_tokens) == sum(out.tokens_entered)
