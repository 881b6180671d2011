"""The ``cost`` command's measurement: ``measure_cost`` of one method on the embedded text (UTF-8
bytes as ids), with thresholds calibrated to a hard ratio on the windows that follow the measured
ones, and conditions that say so."""

from __future__ import annotations

from typing import Optional

from ..data.corpus import embedded_byte_windows
from ..routing.calibration import calibrate_thresholds
from ..stages.ensemble import Ensemble
from .measurement import CostRecord, measure_cost


def embedded_cost(
    ensemble: Ensemble,
    origin,
    method: str = "routed",
    *,
    num_batches: int = 2,
    batch_size: int = 8,
    seq_len: int = 512,
    hard_ratio: float = 0.5,
    warmup: int = 1,
    repeats: int = 5,
    fvcore: bool = True,
    batching: str = "padded",
    positions: str = "compact",
    seed: Optional[int] = None,
) -> CostRecord:
    """The full cost record of ``method`` over ``num_batches`` batches of embedded bytes."""
    per_batch = batch_size * seq_len
    windows = embedded_byte_windows(2 * num_batches * batch_size, seq_len)
    batches = list(windows[: num_batches * batch_size].split(batch_size))
    calibration = list(windows[num_batches * batch_size :].split(batch_size))
    thresholds = calibrate_thresholds(ensemble, calibration, hard_ratio)
    conditions = {
        "dataset": "CPython pydoc_data topics (embedded)",
        "tokenizer": "UTF-8 bytes as ids",
        "split": f"first {num_batches * per_batch} bytes; calibration on the next {num_batches * per_batch}",
        "window": seq_len,
        "stride": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "model": origin,
        "hard_ratio": hard_ratio,
        "calibrated_thresholds": list(thresholds),
    }
    return measure_cost(
        ensemble,
        batches,
        method,
        warmup=warmup,
        repeats=repeats,
        fvcore=fvcore,
        conditions=conditions,
        batching=batching,
        positions=positions,
    )
