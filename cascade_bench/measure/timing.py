"""Timing: wall clock around a whole call, and spans inside a routed pass.

CPU: ``time.perf_counter_ns``, with the thread count recorded in the result's conditions.
CUDA: the device is synchronised before every wall-clock read; spans use CUDA events.
Warm-up runs are untimed; results are medians and IQRs over repeats.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .probes import Probe


@dataclass(frozen=True)
class TimingStats:
    """Seconds per call over ``len(samples)`` timed repeats."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        q1, q3 = quartiles(self.samples)
        return q3 - q1


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartile (inclusive method; both equal the value when there is one)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (math.nan, math.nan)
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def synchronize(device: "Optional[torch.device | str]") -> None:
    """Wait for the device (CUDA only; a no-op elsewhere), before reading a wall clock."""
    device = torch.device(device) if isinstance(device, str) else device
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time_once(fn: Callable[[], object], device: Optional[torch.device] = None) -> float:
    """Seconds for one call of ``fn()``, synchronising CUDA before both clock reads."""
    synchronize(device)
    start = time.perf_counter_ns()
    fn()
    synchronize(device)
    return (time.perf_counter_ns() - start) / 1e9


def time_call(
    fn: Callable[[], object], warmup: int = 1, repeats: int = 5, device: Optional[torch.device] = None
) -> TimingStats:
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` timed times."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    return TimingStats(tuple(wall_time_once(fn, device) for _ in range(repeats)))


class SpanTimer(Probe):
    """A probe that times every span of a pass: one API, two backends.

    CPU: ``perf_counter_ns`` at span entry and exit. CUDA: a pair of
    ``torch.cuda.Event(enable_timing=True)`` per span occurrence, read after one synchronise at
    :meth:`results` (no sync inside the pass). Durations of a span name are summed over its
    occurrences. Also usable as a plain wall timer around the whole pass via :meth:`total`.
    """

    def __init__(self, device: "torch.device | str" = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._cpu: dict[str, int] = {}
        self._events: list[tuple[str, object, object]] = []

    @contextmanager
    def span(self, name: str):
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                stop.record()
                self._events.append((name, start, stop))
        else:
            start = time.perf_counter_ns()
            try:
                yield
            finally:
                self._cpu[name] = self._cpu.get(name, 0) + time.perf_counter_ns() - start

    def results(self) -> dict[str, float]:
        """Seconds per span name (summed over occurrences); synchronises CUDA once."""
        if not self.cuda:
            return {name: ns / 1e9 for name, ns in self._cpu.items()}
        torch.cuda.synchronize(self.device)
        seconds: dict[str, float] = {}
        for name, start, stop in self._events:
            seconds[name] = seconds.get(name, 0.0) + start.elapsed_time(stop) / 1e3
        return seconds


def time_spans(
    fn: Callable[[Probe], object], device: "torch.device | str" = "cpu", warmup: int = 1, repeats: int = 5
) -> tuple[TimingStats, dict[str, TimingStats]]:
    """Time ``fn(probe)`` (a pass that reports spans to ``probe``): wall time around the whole call
    (synchronised) and every span, over ``repeats`` runs after ``warmup``."""
    device = torch.device(device)
    for _ in range(warmup):
        fn(Probe())
    walls, spans = [], {}
    for _ in range(repeats):
        timer = SpanTimer(device)
        walls.append(wall_time_once(lambda: fn(timer), device))
        for name, seconds in timer.results().items():
            spans.setdefault(name, []).append(seconds)
    return TimingStats(tuple(walls)), {name: TimingStats(tuple(v)) for name, v in spans.items()}


def interleaved_ratio(
    fn: "Callable[[], object] | Sequence[Callable[[], object]]",
    reference: "Callable[[], object] | Sequence[Callable[[], object]]",
    pairs: int = 3,
    device: Optional[torch.device] = None,
) -> float:
    """Median over ``pairs`` of time(fn) / time(reference), the two timed back to back (after one
    untimed call of each), so drift of a shared machine between measurements stays out of the ratio.

    ``fn`` and ``reference`` may be equally long sequences of calls (one per batch): each pair then
    times ``fn[i]`` and ``reference[i]`` back to back for every i and compares the sums, so the two
    sides are never more than one batch apart in time."""
    mine, theirs = back_to_back_times(fn, reference, pairs, device)
    return statistics.median(a / b for a, b in zip(mine, theirs))


def back_to_back_times(
    fn: "Callable[[], object] | Sequence[Callable[[], object]]",
    reference: "Callable[[], object] | Sequence[Callable[[], object]]",
    pairs: int = 3,
    device: Optional[torch.device] = None,
    warmup: int = 1,
) -> tuple[list[float], list[float]]:
    """Seconds of ``fn`` and of ``reference`` in each of ``pairs`` repeats, the two timed back to back
    after ``warmup`` untimed calls of each (sequences: summed over their calls, timed in turn)."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    mine_calls = [fn] if callable(fn) else list(fn)
    their_calls = [reference] if callable(reference) else list(reference)
    if len(mine_calls) != len(their_calls) or not mine_calls:
        raise ValueError(
            f"fn and reference must be one call each or equally long sequences, got "
            f"{len(mine_calls)} and {len(their_calls)}"
        )
    for _ in range(warmup):
        for mine, theirs in zip(mine_calls, their_calls):
            mine(), theirs()
    mine_times, their_times = [], []
    for _ in range(pairs):
        mine_total = theirs_total = 0.0
        for mine, theirs in zip(mine_calls, their_calls):
            mine_total += wall_time_once(mine, device)
            theirs_total += wall_time_once(theirs, device)
        mine_times.append(mine_total)
        their_times.append(theirs_total)
    return mine_times, their_times


class PhaseClock:
    """Wall-clock seconds a job spends in each named phase (summed over its entries): where a long
    run's time goes, recorded beside its results. ``with clock("warm_up"): ...``"""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
