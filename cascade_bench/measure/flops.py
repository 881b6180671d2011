"""Counted FLOPs of a real forward with ``torch.utils.flop_counter.FlopCounterMode``.

FLOPs are 2 per multiply-add. Counting runs in its own pass, never inside a timed one.
What is counted: matrix products (``mm``, ``addmm``, ``bmm``, ...: the bias add of ``addmm`` is
not) and attention kernels. Elementwise work (norms, activations, softmax, rotary, the exit
confidence) has no FlopCounterMode formula and counts 0, here and in the analytic model.

Gap fixed here: on CPU, SDPA dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which FlopCounterMode counts as 0 in torch 2.13. We map the SDPA formula onto it, so attention is
counted like on CUDA: as *full* (non-causal) QK^T and PV products, 2 * B * H * S_q * S_k * (D_qk +
D_v) FLOPs, whatever the mask, with H the query heads. The formula is ours, not torch's
``sdpa_flop_count``: before torch 2.11 that one rejects grouped-query shapes (fewer key/value
heads than query heads, as in Llama), which the CPU kernel takes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .probes import Probe

aten = torch.ops.aten


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV of (B, H, S_q, D) queries against (B, H_kv, S_k, D) keys and (B, H_kv, S_k, D_v)
    values: 2 FLOPs per multiply-add, every query head (grouped-query attention repeats the keys)."""
    batch, heads, queries, dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (dim + value_dim)


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


def _is_attention(op_name: str) -> bool:
    return "attention" in op_name


@dataclass(frozen=True)
class StageFlops:
    """Counted FLOPs of one stage, split by the router's spans (see ``probes``).

    layers: the stage's model (attention included); attention: the part of ``layers`` spent in
    attention kernels; exit_head: lm_head and NLL; exit_rule: the confidence; other: everything
    else inside the stage span (gather, scatter, threshold: 0 unless an op there has a formula).
    """

    stage: int
    total: int
    layers: int
    attention: int
    exit_head: int
    exit_rule: int

    @property
    def other(self) -> int:
        return self.total - self.layers - self.exit_head - self.exit_rule


@dataclass(frozen=True)
class FlopBreakdown:
    """Counted FLOPs of one pass: total, per stage, and by aten op."""

    total: int
    stages: tuple[StageFlops, ...]
    by_op: dict

    @property
    def macs(self) -> int:
        return self.total // 2

    def __add__(self, other: "FlopBreakdown") -> "FlopBreakdown":
        if len(self.stages) != len(other.stages):
            raise ValueError(f"cannot add breakdowns of {len(self.stages)} and {len(other.stages)} stages")
        stages = tuple(
            StageFlops(
                a.stage,
                a.total + b.total,
                a.layers + b.layers,
                a.attention + b.attention,
                a.exit_head + b.exit_head,
                a.exit_rule + b.exit_rule,
            )
            for a, b in zip(self.stages, other.stages)
        )
        by_op = dict(self.by_op)
        for op, n in other.by_op.items():
            by_op[op] = by_op.get(op, 0) + n
        return FlopBreakdown(self.total + other.total, stages, by_op)


class FlopProbe(Probe):
    """A probe that counts FLOPs inside every span with its own FlopCounterMode (nested modes all
    see each op, so a span's count includes its sub-spans)."""

    def __init__(self):
        self.per_span: dict[str, int] = {}
        self.per_span_ops: dict[str, dict[str, int]] = {}

    def span(self, name: str):
        return _CountedSpan(self, name)


class _CountedSpan:
    def __init__(self, probe: FlopProbe, name: str):
        self.probe, self.name = probe, name
        self.counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)

    def __enter__(self):
        self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        self.counter.__exit__(*exc)
        probe, name = self.probe, self.name
        probe.per_span[name] = probe.per_span.get(name, 0) + int(self.counter.get_total_flops())
        ops = probe.per_span_ops.setdefault(name, {})
        for op, n in self.counter.get_flop_counts()["Global"].items():
            key = str(op).removeprefix("aten.")
            ops[key] = ops.get(key, 0) + int(n)
        return False


def count_pass_flops(run_pass: Callable[[Probe], object], num_stages: int) -> tuple[FlopBreakdown, object]:
    """Count ``run_pass(probe)`` (a routed/masked/full pass taking a probe) once; return the
    per-stage breakdown and the pass's result. Raises ValueError if some counted FLOPs fall
    outside every stage span (the breakdown would not add up)."""
    probe = FlopProbe()
    total, result = count_flops(run_pass, probe)
    stages = []
    for k in range(num_stages):

        def spent(part: str, k=k) -> int:
            return probe.per_span.get(f"stage{k}{part}", 0)

        attention = sum(n for op, n in probe.per_span_ops.get(f"stage{k}.layers", {}).items() if _is_attention(op))
        stages.append(
            StageFlops(
                stage=k,
                total=spent(""),
                layers=spent(".layers"),
                attention=attention,
                exit_head=spent(".exit_head"),
                exit_rule=spent(".exit_rule"),
            )
        )
    outside = total.flops - sum(s.total for s in stages)
    if outside:
        raise ValueError(f"{outside} counted FLOPs fell outside the stage spans; the breakdown is incomplete")
    return FlopBreakdown(total=total.flops, stages=tuple(stages), by_op=total.by_op), result
