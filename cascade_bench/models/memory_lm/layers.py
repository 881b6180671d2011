"""The four layer types of the family. Every layer is pre-LayerNorm with GPT-NeoX's parallel
residual: ``x + mixer(ln_1(x)) + mlp(ln_2(x))``; the types differ in the mixer.

- ``pythia``: rotary softmax attention over the whole context (KV cache in decoding).
- ``infini``: softmax attention inside each segment, plus a compressive memory of the earlier
  segments read with the same (un-rotated, single-head) queries; a learned per-channel gate
  mixes memory read and local attention (Infini-attention).
- ``multi_memory``: ``num_memories`` independent memories, each with its own key/value
  projections, mixed by softmax attention of the query over their reads.
- ``hierarchical``: a coarse memory written with one summary (the mean key/value) per segment,
  read always, and the fine token-level memory, added through a learned expansion gate that
  opens per token when the coarse read is not enough (coarse first, fine on demand; both are
  computed, so the cost counts both).

Memory layers keep their state in a ``MemoryContext`` shared by the model's layers for one
forward: the layer reads its state at the start and leaves the state after its last segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from .attention import SelfAttention, apply_rotary
from .compressive import CompressiveMemory
from .configuration import MemoryLMConfig
from .segment_cache import SegmentLayer, decode_slot


@dataclass
class MemoryContext:
    """Per memory layer (by layer index): its memories at the start of the forward, replaced by
    the memories after it (a layer absent from ``states`` starts empty)."""

    states: dict = field(default_factory=dict)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.act = nn.GELU()
        self.down = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    """The parallel-residual frame; subclasses define ``mix``."""

    def __init__(self, config: MemoryLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = SelfAttention(config.hidden_size, config.num_attention_heads)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.config = config

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_embeddings: Optional[tuple[Tensor, Tensor]] = None,
        cache=None,
        padding_mask: Optional[Tensor] = None,
        memory: Optional[MemoryContext] = None,
        position_ids: Optional[Tensor] = None,
        use_cache: Optional[bool] = None,
    ) -> Tensor:
        """(B, T, d) -> (B, T, d). ``cache``: the model's cache (written when given). Positions
        enter through ``position_embeddings`` (rotary cos/sin); ``position_ids`` and ``use_cache``
        are accepted because block stages pass every family's layers the same keywords, and
        unused here (a cache given is a cache used)."""
        mixed = self.mix(self.ln_1(hidden_states), attention_mask, position_embeddings, cache, padding_mask, memory)
        return hidden_states + mixed + self.mlp(self.ln_2(hidden_states))

    def mix(self, x, attention_mask, position_embeddings, cache, padding_mask, memory) -> Tensor:
        raise NotImplementedError


class PythiaLayer(Layer):
    """Rotary softmax attention over the whole context."""

    def mix(self, x, attention_mask, position_embeddings, cache, padding_mask, memory) -> Tensor:
        q, k, v = (self.attention.heads(t) for t in self.attention.project(x))
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        return self.attention.out(self.attention.attend(q, k, v, attention_mask))


class SegmentMemoryLayer(Layer):
    """Softmax attention inside segments of ``segment_length`` tokens plus memories of the earlier
    segments; subclasses define the memories (``start``, ``read``, ``write``)."""

    def __init__(self, config: MemoryLMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.gate = nn.Parameter(torch.zeros(config.hidden_size))  # sigmoid(0) = 0.5: both paths at first

    def mix(self, x, attention_mask, position_embeddings, cache, padding_mask, memory) -> Tensor:
        if cache is not None:
            return self._mix_cached(x, position_embeddings, decode_slot(cache, self.layer_idx), padding_mask, memory)
        batch, length, dim = x.shape
        n = self.config.segment_length
        q, k, v = self.attention.project(x)
        local = self._local_attention(q, k, v, position_embeddings, padding_mask)
        state = self._initial_state(batch, x, memory)
        reads = []
        for s in range(0, length, n):
            part = slice(s, min(s + n, length))
            reads.append(self.read(state, q[:, part], x[:, part]))
            if memory is not None or part.stop < length:  # nobody reads the last write unless the state is kept
                state = self.write(
                    state, k[:, part], v[:, part], x[:, part], None if padding_mask is None else padding_mask[:, part]
                )
        if memory is not None:
            memory.states[self.layer_idx] = state
        return self._mixed(torch.cat(reads, dim=1), local)

    def _initial_state(self, batch: int, x: Tensor, memory: Optional[MemoryContext]):
        if memory is None or self.layer_idx not in memory.states:
            return self.start(batch, x)
        return memory.states[self.layer_idx]

    def _mixed(self, reads: Tensor, local: Tensor) -> Tensor:
        gate = torch.sigmoid(self.gate)
        return self.attention.out(gate * reads + (1 - gate) * local)

    def _mix_cached(self, x: Tensor, position_embeddings, slot: SegmentLayer, padding_mask, memory) -> Tensor:
        """Decoding: the new tokens continue the segment the cache holds (its rotated keys/values
        and un-rotated inputs), read the memories of the finished segments, and a segment that
        fills up is written to the memories and dropped from the cache: the cache of this layer
        never holds more than ``segment_length`` tokens."""
        batch, length, _ = x.shape
        kind = self.config.layer_kinds[self.layer_idx]
        if padding_mask is not None and not bool(padding_mask.all()):
            raise NotImplementedError(
                f"{kind} layers decode with a cache only when every row has a real token at every step (no "
                f"padding, no rows left out, no rejected drafts): their segments and memories are per row; run "
                f"such batches without a cache (use_cache=False)"
            )
        if slot.memories is None:
            slot.memories = self._initial_state(batch, x, memory)
            slot.batch_size = batch
        elif slot.batch_size != batch:
            raise NotImplementedError(
                f"a {kind} layer's cache holds {slot.batch_size} rows, but this call has "
                f"{batch}: memory layers decode with every row of the batch in every call"
            )
        n = self.config.segment_length
        q, k, v = self.attention.project(x)
        cos, sin = position_embeddings
        q_heads = apply_rotary(self.attention.heads(q), cos, sin)
        k_heads = apply_rotary(self.attention.heads(k), cos, sin)
        v_heads = self.attention.heads(v)
        reads, local = [], []
        start = 0
        while start < length:
            part = slice(start, start + min(n - slot.seen % n, length - start))
            keys, values = slot.extend(k_heads[:, :, part], v_heads[:, :, part], k[:, part], v[:, part], x[:, part])
            local.append(self.attention.attend(q_heads[:, :, part], keys, values, None))
            reads.append(self.read(slot.memories, q[:, part], x[:, part]))
            if slot.seen % n == 0:  # the segment is full: into the memories, out of the cache (carried
                # to later calls, so without its graph)
                slot.memories = detached(self.write(slot.memories, *slot.finished_segment(), None))
            start = part.stop
        if memory is not None:
            memory.states[self.layer_idx] = slot.memories
        return self._mixed(torch.cat(reads, dim=1), torch.cat(local, dim=1))

    def _local_attention(self, q: Tensor, k: Tensor, v: Tensor, position_embeddings, padding_mask) -> Tensor:
        """Causal rotary attention inside each segment: (B, T, d) -> (B, T, d). A batch no longer
        than one segment is one causal attention over its own length."""
        batch, length, dim = q.shape
        n = min(self.config.segment_length, length)
        segments = -(-length // n)
        pad = segments * n - length
        cos, sin = position_embeddings
        heads = [
            apply_rotary(self.attention.heads(q), cos, sin),
            apply_rotary(self.attention.heads(k), cos, sin),
            self.attention.heads(v),
        ]
        h, d = self.attention.num_heads, self.attention.head_dim
        # (B, H, T, D) -> (B * S, H, N, D): one causal attention per segment, all in one call
        heads = [
            torch.nn.functional.pad(t, (0, 0, 0, pad))
            .view(batch, h, segments, n, d)
            .transpose(1, 2)
            .reshape(batch * segments, h, n, d)
            for t in heads
        ]
        allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        if padding_mask is not None:
            keys = torch.nn.functional.pad(padding_mask.bool(), (0, pad), value=True).view(batch * segments, 1, 1, n)
            allowed = (allowed & keys) | torch.eye(n, dtype=torch.bool, device=q.device)  # a pad query sees itself
        else:
            allowed = allowed.expand(batch * segments, 1, n, n)
        out = self.attention.attend(*heads, allowed)  # (B * S, N, H * D)
        return out.view(batch, segments * n, dim)[:, :length]

    def start(self, batch: int, x: Tensor):
        """The empty memories of a batch of ``batch`` rows."""
        raise NotImplementedError

    def read(self, state, queries: Tensor, x: Tensor) -> Tensor:
        """(B, N, d) reads of one segment's queries (``x``: the segment's normed input)."""
        raise NotImplementedError

    def write(self, state, keys: Tensor, values: Tensor, x: Tensor, valid: Optional[Tensor]):
        """The memories after writing one segment (``valid``: its real tokens)."""
        raise NotImplementedError


def detached(memories):
    """A layer's memories (one ``CompressiveMemory``, or a list or dict of them) without their graph."""
    if isinstance(memories, dict):
        return {k: detached(v) for k, v in memories.items()}
    if isinstance(memories, (list, tuple)):
        return [detached(v) for v in memories]
    return memories.detached()


def _empty(config: MemoryLMConfig, batch: int, x: Tensor) -> CompressiveMemory:
    return CompressiveMemory.empty(batch, config.hidden_size, config.num_memory_banks, x.device, torch.float32)


class InfiniLayer(SegmentMemoryLayer):
    """Infini-attention: one compressive memory, written with the layer's own keys and values."""

    def start(self, batch, x):
        return _empty(self.config, batch, x)

    def read(self, state, queries, x):
        return state.read(queries)

    def write(self, state, keys, values, x, valid):
        return state.written(keys, values, valid, self.config.delta_rule, self.config.segments_per_bank)


class MultiMemoryLayer(SegmentMemoryLayer):
    """``num_memories`` independent memories with their own key/value projections, mixed per
    token by softmax attention of the query over their reads."""

    def __init__(self, config: MemoryLMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        d, m = config.hidden_size, config.num_memories
        self.memory_keys_values = nn.Linear(d, 2 * d * m)

    def start(self, batch, x):
        return [_empty(self.config, batch, x) for _ in range(self.config.num_memories)]

    def read(self, state, queries, x):
        reads = torch.stack([memory.read(queries) for memory in state], dim=2)  # (B, N, M, d)
        scores = torch.einsum("bnd,bnmd->bnm", queries, reads) / queries.shape[-1] ** 0.5
        return torch.einsum("bnm,bnmd->bnd", scores.softmax(dim=-1), reads)

    def write(self, state, keys, values, x, valid):
        projected = self.memory_keys_values(x).view(*x.shape[:2], self.config.num_memories, 2, -1)
        return [
            memory.written(
                projected[:, :, i, 0],
                projected[:, :, i, 1],
                valid,
                self.config.delta_rule,
                self.config.segments_per_bank,
            )
            for i, memory in enumerate(state)
        ]


class HierarchicalLayer(SegmentMemoryLayer):
    """A coarse memory of segment summaries read always, the fine token memory through a learned
    expansion gate (per token and channel)."""

    def __init__(self, config: MemoryLMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.expand = nn.Linear(2 * config.hidden_size, config.hidden_size)
        nn.init.constant_(self.expand.bias, -2.0)  # mostly closed at first: coarse first

    def start(self, batch, x):
        return {"coarse": _empty(self.config, batch, x), "fine": _empty(self.config, batch, x)}

    def read(self, state, queries, x):
        coarse = state["coarse"].read(queries)
        fine = state["fine"].read(queries)
        opening = torch.sigmoid(self.expand(torch.cat([x, coarse], dim=-1)))
        return coarse + opening * fine

    def write(self, state, keys, values, x, valid):
        weights = torch.ones(keys.shape[:2], device=keys.device) if valid is None else valid.to(keys.dtype)
        count = weights.sum(dim=1, keepdim=True).clamp(min=1.0)[..., None]
        summary_keys = (keys * weights[..., None]).sum(dim=1, keepdim=True) / count
        summary_values = (values * weights[..., None]).sum(dim=1, keepdim=True) / count
        summary_valid = weights.sum(dim=1, keepdim=True) > 0
        c = self.config
        return {
            "coarse": state["coarse"].written(
                summary_keys, summary_values, summary_valid, c.delta_rule, c.segments_per_bank
            ),
            "fine": state["fine"].written(keys, values, valid, c.delta_rule, c.segments_per_bank),
        }


LAYER_CLASSES = {
    "pythia": PythiaLayer,
    "infini": InfiniLayer,
    "multi_memory": MultiMemoryLayer,
    "hierarchical": HierarchicalLayer,
}
