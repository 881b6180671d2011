"""What a memory layer keeps in a Hugging Face cache while decoding: a fixed-size state.

A ``SegmentLayer`` takes the memory layer's slot in the cache (``DynamicCache`` or the
toolkit's ``StageCache``, whose layers are a list). It holds the rotated keys/values of the
current segment (at most ``segment_length`` tokens), the un-rotated keys, values and inputs the
segment will be written to the memories with, and the memories of every finished segment. Its
``get_seq_length`` is the number of tokens the layer has seen, so masks and positions built from
the cache stay right. Cropping and beam reordering are not supported: decoding is greedy or
sampled, one row per sequence.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer


class SegmentLayer(DynamicLayer):
    """A memory layer's decoding state (see the module docstring)."""

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.batch_size: Optional[int] = None
        self.memories = None
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []

    def extend(
        self, key_heads: Tensor, value_heads: Tensor, keys: Tensor, values: Tensor, inputs: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Add new tokens to the current segment; return its rotated keys/values (B, H, n, D)."""
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            self.lazy_initialization(key_heads, value_heads)
            self.keys, self.values = key_heads, value_heads
        else:
            self.keys = torch.cat([self.keys, key_heads], dim=-2)
            self.values = torch.cat([self.values, value_heads], dim=-2)
        self.pending.append((keys, values, inputs))
        self.seen += key_heads.shape[-2]
        return self.keys, self.values

    def finished_segment(self) -> tuple[Tensor, Tensor, Tensor]:
        """The current segment's un-rotated keys, values and inputs (B, n, d); the cache forgets it."""
        keys, values, inputs = (torch.cat(parts, dim=1) for parts in zip(*self.pending))
        self.pending = []
        self.keys = self.values = None
        self.is_initialized = False
        return keys, values, inputs

    def get_seq_length(self) -> int:
        return self.seen

    def nbytes(self) -> int:
        """Bytes held: the current segment's keys/values, its pending inputs, and the memories."""
        tensors = [t for t in (self.keys, self.values) if isinstance(t, Tensor)]
        tensors += [t for part in self.pending for t in part]
        return sum(t.numel() * t.element_size() for t in tensors) + _memory_bytes(self.memories)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "memory layers cannot crop their cache: finished segments are already folded into the memories"
        )


def _memory_bytes(memories) -> int:
    """Bytes of a layer's memories: one ``CompressiveMemory``, or a list or dict of them."""
    if memories is None:
        return 0
    if isinstance(memories, dict):
        return sum(_memory_bytes(m) for m in memories.values())
    if isinstance(memories, (list, tuple)):
        return sum(_memory_bytes(m) for m in memories)
    return memories.nbytes()


def decode_slot(cache, layer_idx: int) -> SegmentLayer:
    """The ``SegmentLayer`` of decoder layer ``layer_idx`` in ``cache``, installed on first use.

    ``cache`` is a Hugging Face cache with a ``layers`` list, or a view of one that maps model layer
    indices to its own (``stages.blocks``' block view: ``cache`` and ``offset`` attributes).
    """
    offset = getattr(cache, "offset", 0)
    cache = getattr(cache, "cache", cache)
    index = layer_idx - offset
    layers = cache.layers
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(layers) <= index:
            layers.append(cache.layer_class_to_replicate())
    if index >= len(layers):
        raise ValueError(f"the cache has {len(layers)} layers, but decoder layer {layer_idx} needs slot {index}")
    if not isinstance(layers[index], SegmentLayer):
        layers[index] = SegmentLayer()
    return layers[index]
