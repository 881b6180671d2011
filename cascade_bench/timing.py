"""Wall-clock timing around a whole call: warm-up, repeats, median and IQR.

CPU: ``time.perf_counter_ns`` with the thread count recorded by the caller's conditions.
CUDA: the device is synchronised before every clock read.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


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
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q3 - q1


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time_once(fn: Callable[[], object], device: Optional[torch.device] = None) -> float:
    """Seconds for one call of ``fn()``, synchronising CUDA before both clock reads."""
    _sync(device)
    start = time.perf_counter_ns()
    fn()
    _sync(device)
    return (time.perf_counter_ns() - start) / 1e9


def time_call(fn: Callable[[], object], warmup: int = 1, repeats: int = 5,
              device: Optional[torch.device] = None) -> TimingStats:
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` timed times."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    return TimingStats(tuple(wall_time_once(fn, device) for _ in range(repeats)))
