"""The full cost breakdown of a method over a dataloader, in one record with its quality metrics.

Every measurement runs in its own pass, so none disturbs another:

1. one pass over every batch gives quality (PPL, accuracy, exit ratios, layer cost: the same
   aggregation as ``evaluate``) and, unless ``count_flops=False``, the counted FLOPs per stage and
   component (``flops.FlopProbe``; counting changes no result), itself timed to report the
   counting overhead;
2. wall time of the whole pass (no probe at all), warm-up + repeats;
3. span times (``timing.SpanTimer``: perf_counter_ns on CPU, CUDA events on GPU);
4. analytic FLOPs (``analytic``) and fvcore x2 (``fvcore_check``) from the shapes that ran;
5. peak memory (CUDA max allocated / peak live tensor bytes on CPU; process peak RSS beside it);
6. on CUDA, host-device synchronisations per forward (``torch.cuda.set_sync_debug_mode``).

``timing_batches=n`` times (2, 3, 5, 6) over the first n batches only: quality and FLOPs still
cover every batch, and the record's conditions say what was timed. ``count_flops=False`` leaves
the counted fields None: the analytic count (which equals the counted one exactly, as the tests
check) stands alone, and the record says so.
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from ..data.batch import unpack_batch
from ..measure.analytic import decision_flops, exit_rule_macs, padding_flops, routed_cost
from ..measure.flops import FlopBreakdown, count_pass_flops
from ..measure.memory import peak_memory_bytes
from ..measure.probes import NO_PROBE, Probe
from ..measure.timing import time_call, time_spans
from ..routing.evaluation import EvalResult, Totals
from ..routing.passes import RoutedOutput, forward_cascade
from ..stages.ensemble import Ensemble, evaluation_mode
from .fvcore_check import FvcoreCounter


@dataclass(frozen=True)
class StageCostRecord:
    """One stage's share of a pass over all batches. FLOPs are counted unless named analytic
    (counted fields are None when the pass was not counted)."""

    stage: int
    layers_in_stage: int
    tokens_entered: int
    slots_computed: int
    head_tokens: int
    flops: Optional[int]
    layers_flops: Optional[int]
    attention_flops: Optional[int]
    exit_head_flops: Optional[int]
    exit_fn_flops: Optional[int]
    other_flops: Optional[int]
    padding_flops: int
    analytic_flops: int
    exit_rule_flops: int = 0
    decision_flops: int = 0


@dataclass(frozen=True)
class CostRecord:
    """Quality and cost of one method over a dataloader (see the module docstring for how).

    FLOPs are 2 per multiply-add; ``flops`` / ``macs`` are counted (None when not counted);
    ``flops_fvcore`` is fvcore x2 over every op it counts, ``flops_fvcore_matmul`` the classes both
    tools count alike. Times are seconds for one pass over the timed batches (all of them unless
    ``timing_batches`` was given; see ``conditions``). ``counting_overhead`` = counted pass time
    per token / median uncounted pass time per token. ``decision_flops`` (analytic): what the exit
    decisions computed that no token's final prediction uses: the exit rules' own matmuls plus the
    exit-head logits of tokens that did not exit at that stage.
    """

    method: str
    quality: EvalResult
    flops: Optional[int]
    macs: Optional[int]
    flops_analytic: int
    flops_fvcore: Optional[int]
    flops_fvcore_matmul: Optional[int]
    fvcore_unsupported: dict
    stages: tuple[StageCostRecord, ...]
    flops_by_op: dict
    time_median_s: float
    time_iqr_s: float
    tokens_per_s: float
    spans_median_s: dict
    spans_wall_median_s: float
    counted_pass_s: float
    counting_overhead: float
    peak_memory_bytes: int
    memory_measure: str
    peak_rss_bytes: int
    host_syncs_per_forward: Optional[float]
    conditions: dict = field(default_factory=dict)

    @property
    def decision_flops(self) -> int:
        return sum(s.decision_flops for s in self.stages)


def _prepared(batches: Iterable, device: torch.device) -> list[tuple]:
    prepared = []
    for item in batches:
        ids, mask, targets = unpack_batch(item)
        prepared.append(tuple(None if t is None else t.to(device) for t in (ids, mask, targets)))
    if not prepared:
        raise ValueError("measure_cost got no batches")
    return prepared


def _row_lengths(out: RoutedOutput, stage: int) -> list[int]:
    """Per sequence, real tokens that the stage computed (under ``recompute``: the prefix up to the
    last token that reached it)."""
    reached = out.exit_stage >= (stage if out.method == "routed" else 0)
    if out.kv_policy == "recompute":
        position = torch.cumsum((out.exit_stage >= 0).long(), dim=1)  # 1 + position among real tokens
        return (position * reached).max(dim=1).values.tolist()
    return reached.sum(dim=1).tolist()


def _count_host_syncs(run, device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure_cost(ensemble: Ensemble, batches: Iterable, method: str = "routed", *, warmup: int = 1,
                 repeats: int = 5, fvcore: bool = True, spans: bool = True, conditions: Optional[dict] = None,
                 count_flops: bool = True, timing_batches: Optional[int] = None, **forward_kwargs) -> CostRecord:
    """Quality and the full cost breakdown of ``method`` over ``batches`` (see module docstring).

    ``spans=False`` skips the span-timed repeats (sweeps that need only wall time).
    ``count_flops=False`` skips FlopCounterMode (the analytic count remains). ``timing_batches``:
    time only the first n batches (None: all).
    ``batches`` items are (B, T) tensors, (input_ids, attention_mask, targets) tuples or dicts;
    they are materialised once and moved to the ensemble's device. ``forward_kwargs`` go to
    ``forward_cascade`` (batching, positions, thresholds, ...).
    """
    if timing_batches is not None and (isinstance(timing_batches, bool) or not isinstance(timing_batches, int)
                                       or timing_batches < 1):
        raise ValueError(f"timing_batches must be None (all) or a positive int, got {timing_batches!r}")
    device = ensemble.device
    data = _prepared(batches, device)
    timed = data[:timing_batches] if timing_batches else data
    stages = list(ensemble.stages)
    num_stages = forward_kwargs.get("num_stages") or len(stages)

    def one_pass(probe: Probe = NO_PROBE, over=timed) -> list[RoutedOutput]:
        return [forward_cascade(ensemble, ids, mask, targets, method=method, probe=probe, **forward_kwargs)
                for ids, mask, targets in over]

    with evaluation_mode(ensemble), torch.inference_mode():
        totals = Totals(device)
        counted: Optional[FlopBreakdown] = None
        outputs: list[RoutedOutput] = []
        start = time.perf_counter_ns()
        for ids, mask, targets in data:
            if count_flops:
                breakdown, out = count_pass_flops(
                    lambda probe: forward_cascade(ensemble, ids, mask, targets, method=method, probe=probe,
                                                  **forward_kwargs), num_stages)
                counted = breakdown if counted is None else counted + breakdown
            else:
                out = forward_cascade(ensemble, ids, mask, targets, method=method, **forward_kwargs)
            totals.add(out)
            outputs.append(out)
        counted_pass_s = (time.perf_counter_ns() - start) / 1e9 if count_flops else math.nan
        wall = time_call(one_pass, warmup=warmup, repeats=repeats, device=device)
        span_wall, span_stats = (time_spans(one_pass, device=device, warmup=0, repeats=repeats) if spans
                                 else (None, {}))
        peak, how = 0, ""
        for ids, mask, targets in timed:
            bytes_, how, _ = peak_memory_bytes(
                lambda: forward_cascade(ensemble, ids, mask, targets, method=method, **forward_kwargs), device)
            peak = max(peak, bytes_)
        syncs = _count_host_syncs(one_pass, device)
    quality = totals.result(ensemble, method, conditions)

    configs = [stage.config for stage in stages[:num_stages]]
    fv = FvcoreCounter(stages[:num_stages]) if fvcore else None
    fv_total = None
    stage_records = []
    analytic_total = 0
    for k in range(num_stages):
        analytic_k, padding_k, rule_k, decision_k = 0, 0, 0, 0
        for out in outputs:
            costs = routed_cost(configs, out.stage_batch_shapes, out.head_tokens,
                                exit_rule_macs(stages[:num_stages], out.decided_tokens), out.propagated_tokens)
            analytic_k += costs[k].total
            padding_k += padding_flops(configs[k], out.stage_batch_shapes[k], _row_lengths(out, k))
            rule_k += costs[k].exit_rule
            decision_k += decision_flops(costs, out.head_tokens, out.tokens_exited)[k]
        analytic_total += analytic_k
        c = counted.stages[k] if counted is not None else None
        stage_records.append(StageCostRecord(
            stage=k, layers_in_stage=stages[k].num_layers,
            tokens_entered=sum(o.tokens_entered[k] for o in outputs),
            slots_computed=sum(o.slots_computed[k] for o in outputs),
            head_tokens=sum(o.head_tokens[k] for o in outputs),
            flops=c and c.total, layers_flops=c and c.layers, attention_flops=c and c.attention,
            exit_head_flops=c and c.exit_head, exit_fn_flops=c and c.exit_fn, other_flops=c and c.other,
            padding_flops=padding_k, analytic_flops=analytic_k, exit_rule_flops=rule_k, decision_flops=decision_k))
    if fv is not None:
        from .fvcore_check import FvcoreCount

        fv_total = FvcoreCount()
        for out in outputs:
            fv_total.add(fv.count(out.stage_batch_shapes, out.head_tokens))
    timed_tokens = sum(int(out.tokens_entered[0]) for out in outputs[:len(timed)])
    # Seconds per token of the counted pass over those of the median uncounted pass.
    overhead = (counted_pass_s / quality.routed_tokens) / (wall.median / timed_tokens)
    return CostRecord(
        method=method, quality=quality, flops=counted and counted.total, macs=counted and counted.macs,
        flops_analytic=analytic_total,
        flops_fvcore=None if fv_total is None else fv_total.flops,
        flops_fvcore_matmul=None if fv_total is None else fv_total.matmul_flops,
        fvcore_unsupported={} if fv_total is None else dict(sorted(fv_total.unsupported.items())),
        stages=tuple(stage_records), flops_by_op=counted.by_op if counted is not None else {},
        time_median_s=wall.median, time_iqr_s=wall.iqr, tokens_per_s=timed_tokens / wall.median,
        spans_median_s={name: stats.median for name, stats in sorted(span_stats.items())},
        spans_wall_median_s=span_wall.median if span_wall is not None else math.nan, counted_pass_s=counted_pass_s,
        counting_overhead=overhead, peak_memory_bytes=peak, memory_measure=how,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        host_syncs_per_forward=None if syncs is None else syncs / len(timed),
        conditions={**quality.conditions, "warmup": warmup, "repeats": repeats,
                    "timer": "cuda_events" if device.type == "cuda" else "perf_counter_ns",
                    "timed_batches": len(timed), "timed_tokens": timed_tokens, "batches": len(data),
                    "flops_counted": count_flops},
    )
