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

Inside ``measure.distributed.sharded`` each rank measures its share of the batches (and of the
first ``timing_batches``); counts and FLOPs are summed over ranks, times are the slowest rank's
(per timed repeat), peak memory the largest process's, and the record's conditions say how many
ranks ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
import resource
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Optional, Sequence

import torch

from ..data.batch import unpack_batch
from ..measure.analytic import decision_flops, exit_rule_macs, head_macs_of, padding_flops, routed_cost
from ..measure.distributed import all_ranks, first_share, shard
from ..measure.flops import FlopBreakdown, count_pass_flops
from ..measure.memory import peak_memory_bytes
from ..measure.probes import NO_PROBE, Probe
from ..measure.timing import PhaseClock, TimingStats, time_call, time_spans
from ..routing.evaluation import EvalResult, Totals
from ..routing.passes import RoutedOutput, forward_cascade
from ..routing.stage_reuse import RuleReuse, reuse_for
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
    exit_rule_flops: Optional[int]
    other_flops: Optional[int]
    padding_flops: int
    analytic_flops: int
    analytic_exit_rule_flops: int = 0
    decision_flops: int = 0


@dataclass(frozen=True)
class CostRecord:
    """Quality and cost of one method over a dataloader (see the module docstring for how).

    FLOPs are 2 per multiply-add; ``flops`` / ``macs`` are counted (None when not counted);
    ``flops_fvcore`` is fvcore x2 over every op it counts, ``flops_fvcore_matmul`` the classes both
    tools count alike. Times are seconds for one pass over the timed batches (all of them unless
    ``timing_batches`` was given; see ``conditions``); ``flops_analytic_timed`` is the analytic
    count of those batches alone (None when not timed), the FLOPs a wall time compares with.
    ``counting_overhead`` = counted pass time
    per token / median uncounted pass time per token. ``decision_flops`` (analytic): what the exit
    decisions computed that no token's final prediction uses: the exit rules' own matmuls plus the
    exit-head logits of tokens that did not exit at that stage.
    """

    method: str
    quality: EvalResult
    flops: Optional[int]
    macs: Optional[int]
    flops_analytic: int
    flops_analytic_timed: Optional[int]
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


@dataclass
class _Share:
    """What one rank measured of a pass over its share of the batches (``measure.distributed``)."""

    counted: Optional[FlopBreakdown]
    stages: list
    fvcore: object
    timed_tokens: int
    timed_batches: int
    timed_analytic: int
    batches: int
    wall: tuple
    spans: dict
    span_wall: float
    counted_pass_s: float
    peak: int
    peak_rss: int
    syncs: Optional[int]


def _combined(shares: list) -> _Share:
    """One rank's share as is; several: counts and FLOPs summed, times and memory of the slowest / largest
    rank (the i-th timed repeat of the pass is the slowest rank's i-th repeat)."""
    if len(shares) == 1:
        return shares[0]
    counted = None if shares[0].counted is None else functools.reduce(operator.add, (s.counted for s in shares))
    fvcore_total = None
    if shares[0].fvcore is not None:
        fvcore_total = type(shares[0].fvcore)()
        for s in shares:
            fvcore_total.add(s.fvcore)
    stages = []
    for parts in zip(*(s.stages for s in shares)):
        summed_fields = {
            f.name: (None if getattr(parts[0], f.name) is None else sum(getattr(p, f.name) for p in parts))
            for f in fields(StageCostRecord)
            if f.name not in ("stage", "layers_in_stage")
        }
        stages.append(dataclasses.replace(parts[0], **summed_fields))
    slowest = [max(samples) for samples in zip(*(s.wall for s in shares))]
    spans = {name: max(s.spans[name] for s in shares) for name in shares[0].spans}
    return _Share(
        counted=counted,
        stages=stages,
        fvcore=fvcore_total,
        timed_tokens=sum(s.timed_tokens for s in shares),
        timed_batches=sum(s.timed_batches for s in shares),
        timed_analytic=sum(s.timed_analytic for s in shares),
        batches=sum(s.batches for s in shares),
        wall=tuple(slowest),
        spans=spans,
        span_wall=max(s.span_wall for s in shares),
        counted_pass_s=max(s.counted_pass_s for s in shares),
        peak=max(s.peak for s in shares),
        peak_rss=max(s.peak_rss for s in shares),
        syncs=None if shares[0].syncs is None else sum(s.syncs for s in shares),
    )


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


# Over 60 lines only for its keyword options and their documentation; the body is a sequence of
# steps, each a function of its own.
def measure_cost(
    ensemble: Ensemble,
    batches: Iterable,
    method: str = "routed",
    *,
    warmup: int = 1,
    repeats: int = 5,
    fvcore: bool = True,
    spans: bool = True,
    conditions: Optional[dict] = None,
    count_flops: bool = True,
    timing_batches: Optional[int] = None,
    timed: bool = True,
    reuse: Optional[RuleReuse] = None,
    clock: Optional[PhaseClock] = None,
    **forward_kwargs,
) -> CostRecord:
    """Quality and the full cost breakdown of ``method`` over ``batches`` (see module docstring).

    ``spans=False`` skips the span-timed repeats (sweeps that need only wall time).
    ``count_flops=False`` skips FlopCounterMode (the analytic count remains). ``timing_batches``:
    time only the first n batches (None: all). ``timed=False`` measures no time and no peak memory
    at all (NaN and 0 in the record, "not timed" in its conditions): quality and FLOPs only.
    ``reuse``: the sweep's ``stage_reuse`` under the exit rule in place: the quality pass reads it when
    not counted; a counted one runs every op and only adds to it; timed passes never see it. ``clock``: the wall-time
    measurements (not the quality pass) are added to its ``timing`` phase.
    ``batches`` items are (B, T) tensors, (input_ids, attention_mask, targets) tuples or dicts;
    they are materialised once and moved to the ensemble's device. ``forward_kwargs`` go to
    ``forward_cascade`` (batching, positions, thresholds, ...).
    """
    if timing_batches is not None and (
        isinstance(timing_batches, bool) or not isinstance(timing_batches, int) or timing_batches < 1
    ):
        raise ValueError(f"timing_batches must be None (all) or a positive int, got {timing_batches!r}")
    batches = list(batches)
    data = _prepared(shard(batches), ensemble.device)
    indices = shard(list(range(len(batches))))  # each batch's place in the whole list (reuse's key)
    timed_data = data[: first_share(timing_batches)] if timing_batches else data
    stages = list(ensemble.stages)
    num_stages = forward_kwargs.get("num_stages") or len(stages)

    def run(ids, mask, targets, probe: Probe = NO_PROBE, batch_reuse=None) -> RoutedOutput:
        return forward_cascade(
            ensemble, ids, mask, targets, method=method, probe=probe, reuse=batch_reuse, **forward_kwargs
        )

    with evaluation_mode(ensemble), torch.inference_mode():
        totals, counted, outputs, counted_pass_s = _quality_pass(
            run, data, count_flops, num_stages, ensemble.device, reuse, indices
        )
        with clock("timing") if clock is not None else contextlib.nullcontext():
            timings = _timed(run, timed_data, ensemble.device, warmup, repeats, spans) if timed else _NOT_TIMED
    quality = totals.result(ensemble, method, conditions)
    stage_records, timed_analytic = _stage_records(
        stages[:num_stages], outputs, counted, len(timed_data) if timed else 0
    )
    share = _Share(
        counted=counted,
        stages=stage_records,
        fvcore=_fvcore_total(stages[:num_stages], outputs) if fvcore else None,
        timed_tokens=sum(int(out.tokens_entered[0]) for out in outputs[: len(timed_data)]),
        timed_batches=len(timed_data) if timed else 0,
        timed_analytic=timed_analytic,
        batches=len(data),
        wall=timings.samples,
        spans={name: stats.median for name, stats in timings.span_stats.items()},
        span_wall=timings.span_wall.median if timings.span_wall is not None else math.nan,
        counted_pass_s=counted_pass_s,
        peak=timings.peak,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        syncs=timings.syncs,
    )
    settings = {"warmup": warmup, "repeats": repeats, "flops_counted": count_flops, "timed": timed}
    return _cost_record(method, quality, _combined(all_ranks(share)), timings.memory_measure, ensemble.device, settings)


def _quality_pass(
    run: Callable,
    data: list,
    count_flops: bool,
    num_stages: int,
    device,
    reuse: Optional[RuleReuse] = None,
    indices: Optional[Sequence[int]] = None,
) -> tuple:
    """One pass over every batch: (quality totals, counted FLOPs or None, each batch's output, the
    pass's seconds when counted, else NaN). ``reuse``: kept stage work, read by an uncounted pass and
    only added to by a counted one; ``indices``: each batch's place in the whole list (its key there)."""
    indices = range(len(data)) if indices is None else indices
    totals = Totals(device)
    counted: Optional[FlopBreakdown] = None
    outputs: list[RoutedOutput] = []
    start = time.perf_counter_ns()
    for index, (ids, mask, targets) in zip(indices, data):
        if count_flops:
            keep = reuse_for(reuse, index, reading=False)
            breakdown, out = count_pass_flops(lambda probe: run(ids, mask, targets, probe, keep), num_stages)
            counted = breakdown if counted is None else counted + breakdown
        else:
            out = run(ids, mask, targets, batch_reuse=reuse_for(reuse, index))
        totals.add(out)
        outputs.append(out)
    counted_pass_s = (time.perf_counter_ns() - start) / 1e9 if count_flops else math.nan
    return totals, counted, outputs, counted_pass_s


@dataclass(frozen=True)
class _Clock:
    """What the timed batches gave: the wall time samples of the whole pass, the span-timed pass's
    wall time and spans (None / empty when not span-timed), the peak memory and how it was read, and
    the host-device syncs of one pass (None when not timed)."""

    samples: tuple
    span_wall: Optional[TimingStats]
    span_stats: dict
    peak: int
    memory_measure: str
    syncs: Optional[int]


_NOT_TIMED = _Clock(samples=(math.nan,), span_wall=None, span_stats={}, peak=0, memory_measure="not timed", syncs=None)


def _timed(run: Callable, timed_data: list, device, warmup: int, repeats: int, spans: bool) -> _Clock:
    """Wall time (median of ``repeats`` after ``warmup``), span times, peak memory per batch and host
    syncs of the pass over ``timed_data``."""

    def one_pass(probe: Probe = NO_PROBE) -> list[RoutedOutput]:
        return [run(ids, mask, targets, probe) for ids, mask, targets in timed_data]

    samples = time_call(one_pass, warmup=warmup, repeats=repeats, device=device).samples
    span_wall, span_stats = time_spans(one_pass, device=device, warmup=0, repeats=repeats) if spans else (None, {})
    peak, how = 0, ""
    for ids, mask, targets in timed_data:
        bytes_, how, _ = peak_memory_bytes(lambda: run(ids, mask, targets), device)
        peak = max(peak, bytes_)
    return _Clock(samples, span_wall, span_stats, peak, how, _count_host_syncs(one_pass, device))


def _stage_records(stages: list, outputs: list[RoutedOutput], counted, timed_batches: int) -> tuple[list, int]:
    """Each stage's record (counted FLOPs from ``counted``, analytic ones from each output's shapes) and
    the analytic FLOPs of the first ``timed_batches`` outputs alone: what the wall time covers."""
    configs = [stage.config for stage in stages]
    costs = [
        routed_cost(
            configs,
            out.stage_batch_shapes,
            out.head_tokens,
            exit_rule_macs(stages, out.decided_tokens),
            out.propagated_tokens,
            head_macs_of(stages),
        )
        for out in outputs
    ]
    timed_analytic = sum(cost.total for per_stage in costs[:timed_batches] for cost in per_stage)
    records = []
    for k, stage in enumerate(stages):
        c = counted.stages[k] if counted is not None else None
        records.append(
            StageCostRecord(
                stage=k,
                layers_in_stage=stage.num_layers,
                tokens_entered=sum(o.tokens_entered[k] for o in outputs),
                slots_computed=sum(o.slots_computed[k] for o in outputs),
                head_tokens=sum(o.head_tokens[k] for o in outputs),
                flops=c and c.total,
                layers_flops=c and c.layers,
                attention_flops=c and c.attention,
                exit_head_flops=c and c.exit_head,
                exit_rule_flops=c and c.exit_rule,
                other_flops=c and c.other,
                padding_flops=sum(
                    padding_flops(configs[k], out.stage_batch_shapes[k], _row_lengths(out, k)) for out in outputs
                ),
                analytic_flops=sum(per_stage[k].total for per_stage in costs),
                analytic_exit_rule_flops=sum(per_stage[k].exit_rule for per_stage in costs),
                decision_flops=sum(
                    decision_flops(per_stage, out.head_tokens, out.tokens_exited)[k]
                    for per_stage, out in zip(costs, outputs)
                ),
            )
        )
    return records, timed_analytic


def _fvcore_total(stages: list, outputs: list[RoutedOutput]):
    """fvcore's count of the same pass, batch by batch (``fvcore_check``)."""
    from .fvcore_check import FvcoreCount

    counter, total = FvcoreCounter(stages), FvcoreCount()
    for out in outputs:
        total.add(counter.count(out.stage_batch_shapes, out.head_tokens))
    return total


def _cost_record(method: str, quality, share: _Share, memory_measure: str, device, settings: dict) -> CostRecord:
    """The record of a pass from the quality and every rank's measured share combined (``settings``:
    warmup, repeats, whether FLOPs were counted and time measured)."""
    counted, fv_total, wall, timed = share.counted, share.fvcore, TimingStats(share.wall), settings["timed"]
    timed_tokens, syncs = share.timed_tokens, share.syncs
    # Seconds per token of the counted pass over those of the median uncounted pass.
    overhead = (share.counted_pass_s / quality.routed_tokens) / (wall.median / timed_tokens)
    return CostRecord(
        method=method,
        quality=quality,
        flops=counted and counted.total,
        macs=counted and counted.macs,
        flops_analytic=sum(record.analytic_flops for record in share.stages),
        flops_analytic_timed=share.timed_analytic if share.timed_batches else None,
        flops_fvcore=None if fv_total is None else fv_total.flops,
        flops_fvcore_matmul=None if fv_total is None else fv_total.matmul_flops,
        fvcore_unsupported={} if fv_total is None else dict(sorted(fv_total.unsupported.items())),
        stages=tuple(share.stages),
        flops_by_op=counted.by_op if counted is not None else {},
        time_median_s=wall.median,
        time_iqr_s=wall.iqr if timed else math.nan,
        tokens_per_s=timed_tokens / wall.median,
        spans_median_s=dict(sorted(share.spans.items())),
        spans_wall_median_s=share.span_wall,
        counted_pass_s=share.counted_pass_s,
        counting_overhead=overhead,
        peak_memory_bytes=share.peak,
        memory_measure=memory_measure,
        peak_rss_bytes=share.peak_rss,
        host_syncs_per_forward=None if syncs is None or not share.timed_batches else syncs / share.timed_batches,
        conditions={
            **quality.conditions,
            "warmup": settings["warmup"],
            "repeats": settings["repeats"],
            "timer": "cuda_events" if device.type == "cuda" else "perf_counter_ns",
            "timed_batches": share.timed_batches,
            "timed_tokens": timed_tokens if timed else 0,
            "batches": share.batches,
            "flops_counted": settings["flops_counted"],
            "timed": timed,
        },
    )
