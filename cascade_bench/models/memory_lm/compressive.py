"""A compressive memory: linear attention with ELU+1 features, one head of dim = hidden size.

Writing a segment's keys K and values V adds ``phi(K)^T V`` to the memory matrix M (d x d) and
``sum phi(K)`` to the normaliser z (d); reading with queries Q returns
``phi(Q) M / (phi(Q) z)`` (zero while nothing is written). No positional encoding enters the
memory path. With the delta rule a write adds only ``V - read(K)``: what the memory does not
already return for those keys. Inside one forward pass a write keeps its graph, so the key and
value projections that write the memory learn from the later segments' reads; the state a model
carries from one call to the next is detached (``modeling``: no graph links one call's memory to
the next one's, the seed's double-backward bug).

The memory is a ring of banks: each bank takes ``segments_per_bank`` segments' writes (0 = one
bank, never reset), then the next bank, cleared, takes over; reads pool every bank. Its state is
a dict of tensors and ints (``state()``/``from_state``) that ``torch.save`` writes and another
process loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

EPSILON = 1e-6


def features(x: Tensor) -> Tensor:
    """The positive feature map of linear attention: ELU(x) + 1."""
    return F.elu(x) + 1.0


def _retrieved(q: Tensor, memory: Tensor, normaliser: Tensor) -> Tensor:
    """phi(Q) M / (phi(Q) z) for features (B, N, d), memory (B, d, d) and normaliser (B, d). Plain
    batched matmuls, not einsum: einsum turns a one-token product into an elementwise one, which
    the FLOP counter would miss; the banks are summed before the product (one read per token)."""
    numerator = torch.matmul(q, memory)
    denominator = torch.matmul(q, normaliser[..., None])
    return numerator / (denominator + EPSILON)


@dataclass
class CompressiveMemory:
    """memory (banks, B, d, d), normaliser (banks, B, d); ``bank``: the bank written now, ``filled``:
    segments it holds."""

    memory: Tensor
    normaliser: Tensor
    bank: int = 0
    filled: int = 0

    @classmethod
    def empty(cls, batch: int, dim: int, banks: int, device, dtype) -> "CompressiveMemory":
        return cls(
            torch.zeros(banks, batch, dim, dim, device=device, dtype=dtype),
            torch.zeros(banks, batch, dim, device=device, dtype=dtype),
        )

    def read(self, queries: Tensor) -> Tensor:
        """(B, N, d) queries -> (B, N, d) retrieved values, pooled over banks."""
        q = features(queries).to(self.memory.dtype)
        return _retrieved(q, self.memory.sum(dim=0), self.normaliser.sum(dim=0)).to(queries.dtype)

    def written(
        self, keys: Tensor, values: Tensor, valid: Optional[Tensor], delta_rule: bool, segments_per_bank: int
    ) -> "CompressiveMemory":
        """The memory after writing one segment's (B, N, d) keys/values (``valid``: (B, N) real
        tokens; padding writes nothing), with the write's graph (the carried state is detached by
        the model, between calls)."""
        memory, normaliser, bank, filled = self.memory.clone(), self.normaliser.clone(), self.bank, self.filled
        if segments_per_bank and filled == segments_per_bank:  # this bank is full: the next one, cleared
            bank, filled = (bank + 1) % memory.shape[0], 0
            memory[bank], normaliser[bank] = 0.0, 0.0
        k = features(keys).to(memory.dtype)
        v = values.to(memory.dtype)
        if valid is not None:
            k = k * valid[..., None].to(k.dtype)
        if delta_rule:
            v = v - _retrieved(k, memory[bank], normaliser[bank])
        memory[bank] = memory[bank] + torch.matmul(k.transpose(1, 2), v)
        normaliser[bank] = normaliser[bank] + k.sum(dim=1)
        return CompressiveMemory(memory, normaliser, bank, filled + 1)

    def detached(self) -> "CompressiveMemory":
        """The same state without its graph (what a model carries to its next call)."""
        return CompressiveMemory(self.memory.detach(), self.normaliser.detach(), self.bank, self.filled)

    def state(self) -> dict:
        """Plain tensors (detached) and ints: what ``torch.save`` writes."""
        return {
            "memory": self.memory.detach(),
            "normaliser": self.normaliser.detach(),
            "bank": self.bank,
            "filled": self.filled,
        }

    @classmethod
    def from_state(cls, state: dict) -> "CompressiveMemory":
        return cls(state["memory"], state["normaliser"], int(state["bank"]), int(state["filled"]))

    def nbytes(self) -> int:
        return (
            self.memory.numel() * self.memory.element_size() + self.normaliser.numel() * self.normaliser.element_size()
        )
