"""Gather and scatter: the tokens that reach a stage, laid out as dense (R, L) batches.

Routed tokens are held as a 1-D tensor of *flat indices* into the original (B, T) grid,
sorted, so the tokens of one sequence are contiguous and in their original order.
A :class:`Layout` says where each of them sits in a dense stage batch: sequence s's
continuing tokens fill one row, left-aligned (right padding), in original order.

Batching modes (``BATCHING_MODES``):

- ``"padded"``: one batch, every row padded to the longest row (padding waste reported);
- ``"bucketed"``: rows grouped by length into at most ``max_buckets`` geometric length classes
  (each spanning a factor of at least ``1 + bucket_tolerance``, wide enough that the classes
  cover the shortest row), each padded only to its own longest row: little padding, one stage
  call per non-empty bucket.

No Python loop runs over tokens or sequences: planning costs one host sync per stage
(to learn the dense shapes), gathers and scatters are single indexing ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

BATCHING_MODES = ("padded", "bucketed")


@dataclass(frozen=True)
class Layout:
    """Placement of routed tokens in one dense (num_rows, length) stage batch.

    members: (n,) positions into the routed-token list that this batch holds, or None for all of
        them in order. rows, cols: (n,) row and column of each member in the dense batch.
    """

    members: Optional[Tensor]
    rows: Tensor
    cols: Tensor
    num_rows: int
    length: int

    @property
    def slots(self) -> int:
        return self.num_rows * self.length

    @property
    def is_dense(self) -> bool:
        """True when the batch has no padding and holds all tokens in order: a plain reshape."""
        return self.members is None and self.slots == self.rows.numel()


def rank_in_sequence(flat_index: Tensor, seq_len: int, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """For sorted flat indices (N,) into a (B, T) grid: sequence id (N,), rank within the
    sequence's routed tokens (N,), and routed-token count per sequence (B,)."""
    seq = torch.div(flat_index, seq_len, rounding_mode="floor")
    counts = torch.bincount(seq, minlength=batch_size)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat_index.numel(), device=flat_index.device) - starts[seq]
    return seq, rank, counts


def plan_layouts(flat_index: Tensor, seq_len: int, batch_size: int, batching: str = "padded",
                 max_buckets: int = 4, bucket_tolerance: float = 0.15) -> list[Layout]:
    """Lay out the routed tokens (sorted flat indices, (N,)) as one or more dense batches."""
    if batching not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
    if flat_index.numel() == 0:
        return []
    seq, rank, counts = rank_in_sequence(flat_index, seq_len, batch_size)
    present = counts > 0
    if batching == "padded" or max_buckets <= 1:
        num_rows, length = torch.stack([present.sum(), counts.max()]).tolist()
        row_of_seq = torch.cumsum(present, 0) - 1
        return [Layout(members=None, rows=row_of_seq[seq], cols=rank, num_rows=num_rows, length=length)]
    return _bucketed_layouts(seq, rank, counts, max_buckets, bucket_tolerance)


def _bucketed_layouts(seq: Tensor, rank: Tensor, counts: Tensor, max_buckets: int,
                      tolerance: float) -> list[Layout]:
    # Length class of each sequence: how many factors `step` below the longest row it is, with
    # step = max(1 + tolerance, (longest / shortest) ** (1 / max_buckets)) so that the classes
    # span every length present. Rows of one class differ in length by at most `step`.
    present = counts > 0
    longest = counts.max().float()
    shortest = torch.where(present, counts, counts.max()).min().float()
    step = torch.clamp((longest / shortest) ** (1.0 / max_buckets) * (1 + 1e-6), min=1.0 + tolerance)
    ratio = longest / counts.clamp(min=1).float()
    bucket = torch.floor(torch.log(ratio) / torch.log(step)).long().clamp(max=max_buckets - 1)
    bucket = torch.where(counts > 0, bucket, torch.full_like(bucket, -1))
    # Row of each sequence inside its bucket: rank among present sequences of the same bucket.
    one_hot = torch.nn.functional.one_hot(bucket.clamp(min=0), max_buckets) * (bucket >= 0)[:, None]
    row_of_seq = (torch.cumsum(one_hot, 0) - one_hot).gather(1, bucket.clamp(min=0)[:, None]).squeeze(1)
    rows_per_bucket = one_hot.sum(0)
    length_per_bucket = torch.zeros(max_buckets, dtype=counts.dtype, device=counts.device).scatter_reduce(
        0, bucket.clamp(min=0), counts * (bucket >= 0), reduce="amax")
    bucket_of_token = bucket[seq]
    shapes = torch.stack([rows_per_bucket, length_per_bucket]).tolist()
    if sum(1 for rows in shapes[0] if rows) == 1:  # one bucket holds everyone: same as padded, no member copy
        only = next(b for b, rows in enumerate(shapes[0]) if rows)
        return [Layout(members=None, rows=row_of_seq[seq], cols=rank, num_rows=shapes[0][only],
                       length=shapes[1][only])]
    layouts = []
    for b in range(max_buckets):
        num_rows, length = shapes[0][b], shapes[1][b]
        if num_rows == 0:
            continue
        members = (bucket_of_token == b).nonzero().squeeze(1)
        layouts.append(Layout(members=members, rows=row_of_seq[seq[members]], cols=rank[members],
                              num_rows=num_rows, length=length))
    return layouts


def to_dense(values: Tensor, layout: Layout, fill: float | int = 0) -> Tensor:
    """Gather: place per-token values (N, ...) of the routed tokens into a dense (R, L, ...) batch."""
    if layout.members is not None:
        values = values.index_select(0, layout.members)
    if layout.is_dense:
        return values.reshape(layout.num_rows, layout.length, *values.shape[1:])
    dense = values.new_full((layout.num_rows, layout.length, *values.shape[1:]), fill)
    dense[layout.rows, layout.cols] = values
    return dense


def from_dense(dense: Tensor, layout: Layout) -> Tensor:
    """Inverse of :func:`to_dense`: per-token values (n, ...) in the layout's member order."""
    if layout.is_dense:
        return dense.reshape(layout.slots, *dense.shape[2:])
    return dense[layout.rows, layout.cols]


def scatter_members(target: Tensor, layout: Layout, values: Tensor) -> None:
    """Write one layout's per-member values back into the routed-token tensor ``target`` (N, ...)."""
    if layout.members is None:
        target.copy_(values)
    else:
        target.index_copy_(0, layout.members, values)
