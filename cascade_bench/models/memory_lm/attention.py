"""Softmax self-attention with partial rotary positions, shared by every layer type of the family.

``SelfAttention.project`` gives the rotated multi-head queries/keys, the values, and the
un-rotated single-head (dim = hidden size) queries/keys/values that memory layers read and write
with. ``SelfAttention.attend`` is causal softmax attention over what the cache holds (or over the
given tokens), with an optional 4-D mask from Hugging Face's mask builder.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotating the first ``dim`` channels of each head (GPT-NeoX layout)."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim, self.theta = dim, theta

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) positions -> cos, sin of shape (B, 1, T, dim) in ``x``'s dtype (Hugging Face's rotary
        signature). The frequencies are computed here, not kept in a buffer: Hugging Face's loader
        leaves non-persistent buffers uninitialised."""
        steps = torch.arange(0, self.dim, 2, dtype=torch.float32, device=position_ids.device) / max(self.dim, 1)
        inv_freq = 1.0 / (self.theta**steps)
        angles = position_ids[..., None].float() * inv_freq  # (B, T, dim / 2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of (B, H, T, D) ``x``; the rest pass through."""
    dim = cos.shape[-1]
    if dim == 0:
        return x
    rotated, passed = x[..., :dim], x[..., dim:]
    return torch.cat([rotated * cos + _rotate_half(rotated) * sin, passed], dim=-1)


class SelfAttention(nn.Module):
    """Query/key/value projections (one fused matmul), output projection, softmax attention."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, d) -> queries, keys, values (B, T, d) each, before heads and positions."""
        return self.qkv(x).chunk(3, dim=-1)

    def heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Multi-head (B, H, Tq, D) queries over (B, H, Tk, D) keys; the last Tq keys are the
        queries' own. ``mask``: a 4-D bool (True = attend) or additive mask, else causal."""
        tq, tk = q.shape[2], k.shape[2]
        if mask is None and tq > 1:
            mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)
