"""Full cascade vs routed early exit (both batching modes) vs masked early exit, CPU preset.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group

Each benchmark carries counted FLOPs, the FLOP ratio to the full cascade, layer cost, exit
ratios, tokens and PPL in ``extra_info``. For ratios measured in one interleaved run, use
``cascade-bench bench-routing`` instead (pytest-benchmark times one benchmark after another).
"""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench.calibration import threshold_for_hard_ratio
from cascade_bench.flops import count_flops
from cascade_bench.routing import forward_cascade
from cascade_bench.routing_bench import BENCH_METHODS

EXIT_RATIOS = (0.25, 0.5, 0.75)


@pytest.fixture(scope="module")
def thresholds(cpu_preset):
    ensemble, ids = cpu_preset
    with torch.inference_mode():
        probe = forward_cascade(ensemble, ids, num_stages=1, confidence_at_last_stage=True)
    confidence = probe.stage_confidence[0]
    return {ratio: threshold_for_hard_ratio(confidence, 1.0 - ratio) for ratio in EXIT_RATIOS}


@pytest.fixture(scope="module")
def full_flops(cpu_preset):
    ensemble, ids = cpu_preset
    with torch.inference_mode():
        return count_flops(forward_cascade, ensemble, ids, method="full")[0].flops


@pytest.mark.parametrize("method", list(BENCH_METHODS))
@pytest.mark.parametrize("exit_ratio", EXIT_RATIOS)
def test_routing_methods(benchmark, cpu_preset, thresholds, full_flops, method, exit_ratio):
    ensemble, ids = cpu_preset
    kwargs = dict(BENCH_METHODS[method], thresholds=[thresholds[exit_ratio]])
    benchmark.group = f"routing, {exit_ratio:.0%} exit after stage 0"

    def forward():
        with torch.inference_mode():
            return forward_cascade(ensemble, ids, **kwargs)

    out = benchmark.pedantic(forward, rounds=5, warmup_rounds=1, iterations=1)
    with torch.inference_mode():
        flops = count_flops(forward_cascade, ensemble, ids, **kwargs)[0].flops
    ppl = math.exp(float(out.nll[out.scored].double().mean()))
    benchmark.extra_info.update(
        counted_flops=flops, flop_ratio=flops / full_flops, layer_cost=out.layer_cost,
        exit_ratios=list(out.exit_ratios), tokens=out.num_tokens, ppl=ppl, padding_waste=list(out.padding_waste),
        device=str(ids.device), dtype=str(ensemble.dtype), threads=torch.get_num_threads())
    if method == "full":
        assert out.exit_ratios == (0.0, 1.0) and out.layer_cost == 1.0
    else:
        assert out.exit_ratios[0] == pytest.approx(exit_ratio, abs=1 / out.num_tokens)
    if method.startswith("routed"):
        assert out.layer_cost == pytest.approx(1 - exit_ratio / 2, abs=1e-3)
        assert out.tokens_entered[1] == round((1 - exit_ratio) * out.num_tokens)
