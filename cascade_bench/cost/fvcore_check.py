"""fvcore ``FlopCountAnalysis`` as a cross-check of the counted FLOPs (docs/design.md section 3).

fvcore traces with TorchScript, so each stage is traced on its own through a wrapper that
returns a plain tensor (HF models return DynamicCache/ModelOutput objects that jit tracing can't
handle), once per dense batch shape that actually ran (a trace bakes in one path), plus the exit
head on the number of tokens it projected. fvcore counts one per multiply-add: figures here are
x2, to compare with the counter's 2-per-MAC FLOPs.

fvcore has no handle for ``aten::scaled_dot_product_attention``; we give it one (QK^T + PV,
counted full, as the counter). fvcore also counts ops the counter doesn't (``layer_norm``, as
elementwise work) and skips others (elementwise ops, RMSNorm pieces, activations); both are
reported, and :data:`MATMUL_OPS` names the classes both count the same way.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..stages.stage import Stage

#: fvcore operator classes that count the same matrix products as FlopCounterMode.
MATMUL_OPS = frozenset({"linear", "addmm", "mm", "bmm", "matmul", "einsum", "scaled_dot_product_attention"})


def _sdpa_macs(inputs, outputs) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: B*H*Sq*Sk*(Dqk + Dv) MACs."""
    from fvcore.nn.jit_handles import get_shape

    query, key, value = (get_shape(v) for v in inputs[:3])
    *batch, s_q, d_qk = query
    s_k, d_v = key[-2], value[-1]
    heads = 1
    for n in batch:
        heads *= n
    return heads * s_q * s_k * (d_qk + d_v)


class _TraceableStage(nn.Module):
    """A stage as tensor in, output state out, for ``torch.jit.trace``."""

    def __init__(self, stage: nn.Module, reads_ids: bool):
        super().__init__()
        self.stage = stage
        self.reads_ids = reads_ids

    def forward(self, inputs, position_ids, attention_mask):
        key = "input_ids" if self.reads_ids else "inputs_embeds"
        return self.stage(**{key: inputs}, position_ids=position_ids, attention_mask=attention_mask).hidden


class _TraceableHead(nn.Module):
    """A stage's exit head (``stage.logits``: lm_head, after the final norm for a Block)."""

    def __init__(self, stage: nn.Module):
        super().__init__()
        self.stage = stage

    def forward(self, hidden):
        return self.stage.logits(hidden)


@dataclass
class FvcoreCount:
    """fvcore FLOPs (x2), by operator class, and the ops it skipped (name -> times seen)."""

    flops: int = 0
    by_op: dict = field(default_factory=dict)
    unsupported: dict = field(default_factory=dict)

    @property
    def matmul_flops(self) -> int:
        """The part of ``flops`` in :data:`MATMUL_OPS`, comparable to FlopCounterMode's total."""
        return sum(n for op, n in self.by_op.items() if op in MATMUL_OPS)

    def add(self, other: "FvcoreCount", times: int = 1) -> None:
        self.flops += times * other.flops
        for target, source in ((self.by_op, other.by_op), (self.unsupported, other.unsupported)):
            for op, n in source.items():
                target[op] = target.get(op, 0) + times * n


def _analyse(module: nn.Module, inputs: tuple) -> FvcoreCount:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit tracer and deprecation chatter, not results
        from fvcore.nn import FlopCountAnalysis

        logging.getLogger("fvcore").setLevel(logging.ERROR)
        analysis = FlopCountAnalysis(module, inputs)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_op = {op: 2 * int(n) for op, n in analysis.by_operator().items()}
        unsupported = dict(analysis.unsupported_ops())
    return FvcoreCount(flops=sum(by_op.values()), by_op=by_op, unsupported=unsupported)


class FvcoreCounter:
    """fvcore counts per stage, traced once per (stage, shape) and reused."""

    def __init__(self, stages: Sequence[Stage]):
        self.stages = list(stages)
        self._cache: dict[tuple, FvcoreCount] = {}

    def _stage_shape(self, k: int, rows: int, length: int) -> FvcoreCount:
        key = ("layers", k, rows, length)
        if key not in self._cache:
            stage = self.stages[k]
            device = stage.device
            if k == 0:
                inputs = torch.zeros(rows, length, dtype=torch.long, device=device)
            else:
                inputs = torch.zeros(rows, length, stage.hidden_size, dtype=stage.dtype, device=device)
            positions = torch.arange(length, device=device).expand(rows, -1).contiguous()
            mask = torch.ones(rows, length, dtype=torch.long, device=device)
            with torch.no_grad():
                self._cache[key] = _analyse(_TraceableStage(stage, k == 0), (inputs, positions, mask))
        return self._cache[key]

    def _head(self, k: int, tokens: int) -> FvcoreCount:
        key = ("head", k, tokens)
        if key not in self._cache:
            stage = self.stages[k]
            hidden = torch.zeros(tokens, stage.hidden_size, dtype=stage.dtype, device=stage.device)
            with torch.no_grad():
                self._cache[key] = _analyse(_TraceableHead(stage), (hidden,))
        return self._cache[key]

    def count(self, stage_batch_shapes, head_tokens: Sequence[int]) -> FvcoreCount:
        """fvcore FLOPs of one pass, from RoutedOutput.stage_batch_shapes and .head_tokens."""
        total = FvcoreCount()
        for k, (shapes, tokens) in enumerate(zip(stage_batch_shapes, head_tokens)):
            for shape in shapes:
                if len(shape) != 2:
                    raise ValueError(
                        f"the fvcore cross-check traces stage batches without extra keys; stage {k} ran "
                        f"{shape} (rows, queries, keys: K/V propagation); pass fvcore=False"
                    )
                total.add(self._stage_shape(k, *shape))
            if tokens:
                total.add(self._head(k, tokens))
        return total
