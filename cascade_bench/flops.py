"""Counted FLOPs of a real forward with ``torch.utils.flop_counter.FlopCounterMode``.

FLOPs are 2 per multiply-add. Counting runs in its own pass, never inside a timed one.

Gap fixed here: on CPU, SDPA dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which FlopCounterMode counts as 0 in torch 2.13. We map torch's own SDPA formula onto it, so
attention is counted like on CUDA: as *full* (non-causal) QK^T and PV products,
4 * B * H * S_q * S_k * D FLOPs, whatever the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: Attention kernels FlopCounterMode misses, mapped to torch's SDPA formula.
EXTRA_FLOP_FORMULAS = {}
if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
    EXTRA_FLOP_FORMULAS[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops


@dataclass(frozen=True)
class FlopCount:
    """Total counted FLOPs (2 per MAC) and the same split by aten op name."""

    flops: int
    by_op: dict

    @property
    def macs(self) -> int:
        return self.flops // 2


def count_flops(fn: Callable, *args, **kwargs) -> tuple[FlopCount, object]:
    """Run ``fn(*args, **kwargs)`` once under FlopCounterMode; return (counts, fn's result)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        result = fn(*args, **kwargs)
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return FlopCount(flops=int(counter.get_total_flops()), by_op=by_op), result
