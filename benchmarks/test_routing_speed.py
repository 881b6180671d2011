"""Full cascade, routed early exit (both batching modes), masked early exit and the dense
same-depth model, at hard ratios 100/75/50/25/0% past stage 0 and two batch shapes; plus the
routing primitives (exit decision, gather, scatter) alone.

    pytest benchmarks/ --benchmark-only                        # CPU preset
    pytest benchmarks/ --benchmark-only --cascade-preset gpu   # GPU preset (CUDA)

Every record carries in ``extra_info``: counted FLOPs, FLOP ratio to the full cascade, layer
cost, exit ratio per stage, tokens, NLL and PPL of its batch, device, dtype, threads, and on
CUDA the span times from CUDA events. ``cascade-bench bench-report`` turns the JSON into tables
and a cost-vs-time plot. pytest-benchmark times one benchmark after another, so the machine's
drift enters ratios of their medians; each record therefore also carries
``wall_ratio_interleaved``, its time over the full cascade's timed back to back (median of 2
pairs), and ``cascade-bench bench-routing`` interleaves whole sweeps.
"""

from __future__ import annotations

import math

import pytest
import torch

from cascade_bench.data.corpus import byte_token_windows
from cascade_bench.measure.flops import count_flops
from cascade_bench.measure.timing import SpanTimer, interleaved_ratio, synchronize
from cascade_bench.routing.calibration import threshold_for_hard_ratio
from cascade_bench.routing.compaction import from_dense, plan_layouts, to_dense
from cascade_bench.routing.passes import forward_cascade

HARD_RATIOS = (1.0, 0.75, 0.5, 0.25, 0.0)
EE_METHODS = {
    "routed-padded": dict(method="routed", batching="padded"),
    "routed-bucketed": dict(method="routed", batching="bucketed"),
    "masked": dict(method="masked"),
}
SHAPE_INDEX = (0, 1)


@pytest.fixture(scope="module")
def setup(bench_preset, cascades, text):
    """Per batch shape: input ids, stage-0 thresholds for each hard ratio, full-cascade FLOPs."""
    cascade, dense = cascades
    prepared = {}
    with torch.inference_mode():
        for index in SHAPE_INDEX:
            ids = byte_token_windows(text, *bench_preset.shapes[index]).to(bench_preset.device)
            probe = forward_cascade(cascade, ids, num_stages=1, confidence_at_last_stage=True)
            confidence = probe.stage_confidence[0]
            thresholds = {r: threshold_for_hard_ratio(confidence, r) for r in HARD_RATIOS}
            full_flops = count_flops(forward_cascade, cascade, ids, method="full")[0].flops
            prepared[index] = (ids, thresholds, full_flops)
    return prepared


def _run(benchmark, ensemble, ids, full_flops, device, full_cascade=None, **kwargs):
    def forward():
        with torch.inference_mode():
            out = forward_cascade(ensemble, ids, **kwargs)
        synchronize(device)  # the timed call includes the GPU work, not only its launch
        return out

    def full():
        with torch.inference_mode():
            forward_cascade(full_cascade, ids, method="full")
        synchronize(device)

    out = benchmark.pedantic(forward, rounds=5, warmup_rounds=2, iterations=1)
    if full_cascade is not None and not benchmark.disabled:
        benchmark.extra_info["wall_ratio_interleaved"] = interleaved_ratio(forward, full, pairs=2)
    with torch.inference_mode():
        flops = count_flops(forward_cascade, ensemble, ids, **kwargs)[0].flops
        spans = {}
        if torch.device(device).type == "cuda":
            timer = SpanTimer(device)
            forward_cascade(ensemble, ids, probe=timer, **kwargs)
            spans = {name: seconds * 1e3 for name, seconds in timer.results().items()}
    nll = float(out.nll[out.scored].double().mean())
    benchmark.extra_info.update(
        counted_flops=flops,
        flop_ratio=flops / full_flops,
        layer_cost=out.layer_cost,
        exit_ratios=list(out.exit_ratios),
        tokens=out.num_tokens,
        nll=nll,
        ppl=math.exp(nll),
        batch_shape=list(ids.shape),
        device=str(ids.device),
        dtype=str(ensemble.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        cuda_span_ms=spans,
    )
    return out, flops


@pytest.mark.parametrize("shape_index", SHAPE_INDEX)
@pytest.mark.parametrize("baseline", ["full", "dense"])
def test_baselines(benchmark, bench_preset, cascades, setup, shape_index, baseline):
    cascade, dense = cascades
    ids, _, full_flops = setup[shape_index]
    benchmark.group = f"{tuple(bench_preset.shapes[shape_index])}: baselines"
    model = cascade if baseline == "full" else dense
    out, flops = _run(
        benchmark,
        model,
        ids,
        full_flops,
        bench_preset.device,
        full_cascade=cascade if baseline == "dense" else None,
        method="full",
    )
    assert out.layer_cost == 1.0 and out.exit_ratios[-1] == 1.0
    if baseline == "full":
        assert flops == full_flops
    else:  # same depth, one lm_head: the same matrix products as the full cascade
        assert flops == full_flops


@pytest.mark.parametrize("shape_index", SHAPE_INDEX)
@pytest.mark.parametrize("hard_ratio", HARD_RATIOS)
@pytest.mark.parametrize("method", list(EE_METHODS))
def test_early_exit(benchmark, bench_preset, cascades, setup, shape_index, hard_ratio, method):
    cascade, _ = cascades
    ids, thresholds, full_flops = setup[shape_index]
    benchmark.group = f"{tuple(bench_preset.shapes[shape_index])}: {hard_ratio:.0%} continue past stage 0"
    out, flops = _run(
        benchmark,
        cascade,
        ids,
        full_flops,
        bench_preset.device,
        full_cascade=cascade,
        thresholds=[thresholds[hard_ratio]],
        **EE_METHODS[method],
    )
    assert out.exit_ratios[0] == pytest.approx(1 - hard_ratio, abs=1 / out.num_tokens)
    if method.startswith("routed"):
        assert out.layer_cost == pytest.approx((1 + hard_ratio) / 2, abs=1e-3)
        assert out.tokens_entered[1] == round(hard_ratio * out.num_tokens)
    else:
        assert out.layer_cost == 1.0 and flops > full_flops  # every stage, plus the stage-0 head


@pytest.fixture(scope="module")
def mid_route(bench_preset, cascades, setup):
    """What the router holds after stage 0 at 50% exit: hidden states, confidences, continuing tokens."""
    cascade, _ = cascades
    ids, thresholds, _ = setup[0]
    with torch.inference_mode():
        hidden = cascade[0](input_ids=ids).hidden.reshape(-1, cascade[0].hidden_size)
        out = forward_cascade(cascade, ids, thresholds=[thresholds[0.5]])
        confidence = out.stage_confidence[0].reshape(-1)
    return ids, hidden, confidence, thresholds[0.5]


@pytest.mark.benchmark(group="routing primitives (50% exit, first batch shape)")
@pytest.mark.parametrize("primitive", ["exit decision", "gather", "scatter"])
def test_routing_primitives(benchmark, bench_preset, cascades, mid_route, primitive):
    cascade, _ = cascades
    ids, hidden, confidence, threshold = mid_route
    batch, seq_len = ids.shape
    reach = torch.arange(ids.numel(), device=ids.device)
    continuing = reach[confidence < threshold]
    (layout,) = plan_layouts(continuing, seq_len, batch, "padded")
    dense = to_dense(hidden[confidence < threshold], layout)
    nll_buffer = torch.zeros(ids.numel(), device=ids.device)

    def decision():
        exits = confidence >= threshold
        return reach[~exits], hidden[~exits]

    def gather():
        (lay,) = plan_layouts(continuing, seq_len, batch, "padded")
        return to_dense(hidden[confidence < threshold], lay)

    def scatter():
        values = from_dense(dense, layout)
        nll_buffer[continuing] = values[:, 0].float()
        return values

    fn = {"exit decision": decision, "gather": gather, "scatter": scatter}[primitive]

    def timed():
        with torch.inference_mode():
            result = fn()
        synchronize(bench_preset.device)
        return result

    result = benchmark.pedantic(timed, rounds=20, warmup_rounds=3, iterations=1)
    # Share of a routed forward spent in the router's own gather and scatter spans (one timed pass).
    with torch.inference_mode():
        timer = SpanTimer(bench_preset.device)
        forward_cascade(cascade, ids, thresholds=[threshold], probe=timer)
        spans = timer.results()
    total = sum(spans[f"stage{k}"] for k in range(2))
    own = sum(spans.get(f"stage{k}.{part}", 0.0) for k in range(2) for part in ("gather", "scatter"))
    benchmark.extra_info.update(
        routing_share_of_forward=own / total,
        tokens=ids.numel(),
        continuing=int(continuing.numel()),
        device=str(ids.device),
    )
    rows = result[0].shape[0] if primitive == "exit decision" else result.shape[0]
    assert (
        rows
        == {"exit decision": continuing.numel(), "gather": layout.num_rows, "scatter": continuing.numel()}[primitive]
    )


@pytest.fixture(scope="module")
def rule_cascades(cascades, setup):
    """The cascade under each exit rule of ``bench-routing`` (copies; see ``bench.routing.copy_with_rule``),
    with stage 0's threshold for 50% exit on the first batch shape."""
    from cascade_bench.bench.routing import BENCH_RULES, copy_with_rule
    from cascade_bench.data.batch import most_frequent_ids

    cascade, _ = cascades
    ids, _, _ = setup[0]
    candidates = most_frequent_ids([ids], cascade.vocab_size, cascade.vocab_size)
    prepared = {}
    with torch.inference_mode():
        for spec in BENCH_RULES:
            ruled = copy_with_rule(cascade, spec, candidates)
            probe = forward_cascade(ruled, ids, num_stages=1, confidence_at_last_stage=True)
            prepared[spec] = (ruled, threshold_for_hard_ratio(probe.stage_confidence[0], 0.5))
    return prepared


@pytest.mark.parametrize("rule", ["max_prob", "cos_sim", "classifier", "lowrank:64", "topk:1024"])
def test_exit_rules(benchmark, bench_preset, cascades, setup, rule_cascades, rule):
    """Routed early exit (bucketed, the run's default batching) at 50% exit after stage 0 under each exit
    rule; ``extra_info`` adds the rule's own MACs per token. Issue 15's bar for the classifier: FLOP
    ratio <= layer cost + 0.05 (padded batching adds about 12% padding slots to stage 1 here, which
    alone takes it to 0.804; ``bench-routing`` shows both modes)."""
    cascade, _ = cascades
    ids, _, full_flops = setup[0]
    ruled, threshold = rule_cascades[rule]
    benchmark.group = f"{tuple(bench_preset.shapes[0])}: exit rules at 50% exit"
    out, flops = _run(
        benchmark,
        ruled,
        ids,
        full_flops,
        bench_preset.device,
        full_cascade=cascade,
        thresholds=[threshold],
        method="routed",
        batching="bucketed",
    )
    benchmark.extra_info["rule_macs_per_token"] = ruled[0].exit_rule.macs_per_token
    assert out.exit_ratios[0] == pytest.approx(0.5, abs=1 / out.num_tokens)
    if rule == "classifier":
        assert flops / full_flops <= out.layer_cost + 0.05  # counted FLOPs: deterministic, not a timing
