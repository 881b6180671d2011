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
  call per bucket. Adjacent classes are merged where the padding a merge adds costs less than the
  stage call it saves (``call_overhead_slots``: a call's fixed cost counted in slots), so small
  batches get one call and large ones keep their buckets.

No Python loop runs over tokens or sequences: planning costs one host sync per stage to learn the
dense shapes (two when bucketed batching does split the rows into several calls), gathers and
scatters are single indexing ops. A stage that every token of a full grid reaches (stage 0 of a
batch without padding) is laid out without planning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

BATCHING_MODES = ("padded", "bucketed")

#: A stage call's fixed cost in dense slots: what the bucketed layout weighs one more call against
#: (the padding slots a merged call computes instead). Measured on the default run's stages (GPT-2
#: style, hidden 128, 2 layers, 2 CPU threads): a call costs about 1.4 ms plus 12-15 us per slot, so
#: one call is worth about 100 slots; rounded up to one 128-token row. On a GPU the fixed cost is
#: larger still against a slot's, so merging more is the right direction there too.
#: ``CASCADE_BENCH_CALL_OVERHEAD_SLOTS`` (an int >= 0) sets it for a process and its workers; records
#: name the value their batches were laid out with.
CALL_OVERHEAD_ENV = "CASCADE_BENCH_CALL_OVERHEAD_SLOTS"


def _call_overhead_from_environment(default: int = 128) -> int:
    value = os.environ.get(CALL_OVERHEAD_ENV, "")
    if not value:
        return default
    if not value.isdigit():
        raise ValueError(f"{CALL_OVERHEAD_ENV}={value!r}: expected an int >= 0 (a stage call's fixed cost in slots)")
    return int(value)


CALL_OVERHEAD_SLOTS = _call_overhead_from_environment()


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


def plan_layouts(
    flat_index: Tensor,
    seq_len: int,
    batch_size: int,
    batching: str = "padded",
    max_buckets: int = 4,
    bucket_tolerance: float = 0.15,
    call_overhead_slots: Optional[int] = None,
) -> list[Layout]:
    """Lay out the routed tokens (sorted flat indices, (N,)) as one or more dense batches.

    call_overhead_slots (bucketed only): a stage call's fixed cost in slots (None: the module's
    ``CALL_OVERHEAD_SLOTS`` when called); 0 keeps every length class apart (least padding, most calls)."""
    if batching not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
    if call_overhead_slots is None:
        call_overhead_slots = CALL_OVERHEAD_SLOTS
    if isinstance(call_overhead_slots, bool) or not isinstance(call_overhead_slots, int) or call_overhead_slots < 0:
        raise ValueError(f"call_overhead_slots must be an int >= 0, got {call_overhead_slots!r}")
    count = flat_index.numel()
    if count == 0:
        return []
    if count == batch_size * seq_len:  # every slot of the grid: one batch, no padding, no planning
        grid = torch.arange(count, device=flat_index.device)
        rows = torch.div(grid, seq_len, rounding_mode="floor")
        return [Layout(members=None, rows=rows, cols=grid - rows * seq_len, num_rows=batch_size, length=seq_len)]
    seq, rank, counts = rank_in_sequence(flat_index, seq_len, batch_size)
    present = counts > 0
    num_rows, length = torch.stack([present.sum(), counts.max()]).tolist()
    # One call is the cheapest grouping whenever its padding costs less than a second call: any two
    # calls cost at least every token plus two calls' overhead (``cheapest_grouping``'s cost).
    if batching == "padded" or max_buckets <= 1 or num_rows * length - count < call_overhead_slots:
        return [_one_padded_batch(seq, rank, present, num_rows, length)]
    return _bucketed_layouts(seq, rank, counts, max_buckets, bucket_tolerance, call_overhead_slots)


def _one_padded_batch(seq: Tensor, rank: Tensor, present: Tensor, num_rows: int, length: int) -> Layout:
    """Every routed token in one batch: a row per sequence that has any, in sequence order."""
    row_of_seq = torch.cumsum(present, 0) - 1
    return Layout(members=None, rows=row_of_seq[seq], cols=rank, num_rows=num_rows, length=length)


def _bucketed_layouts(
    seq: Tensor, rank: Tensor, counts: Tensor, max_buckets: int, tolerance: float, call_overhead_slots: int
) -> list[Layout]:
    # Length class of each sequence: how many factors `step` below the longest row it is, with
    # step = max(1 + tolerance, (longest / shortest) ** (1 / max_buckets)) so that the classes
    # span every length present. Rows of one class differ in length by at most `step`.
    present = counts > 0
    longest = counts.max().float()
    shortest = torch.where(present, counts, counts.max()).min().float()
    step = torch.clamp((longest / shortest) ** (1.0 / max_buckets) * (1 + 1e-6), min=1.0 + tolerance)
    ratio = longest / counts.clamp(min=1).float()
    bucket = torch.floor(torch.log(ratio) / torch.log(step)).long().clamp(max=max_buckets - 1)
    one_hot = torch.nn.functional.one_hot(bucket, max_buckets) * present[:, None]
    length_per_bucket = torch.zeros(max_buckets, dtype=counts.dtype, device=counts.device).scatter_reduce(
        0, bucket, counts * present, reduce="amax"
    )
    rows, lengths = torch.stack([one_hot.sum(0), length_per_bucket]).tolist()  # the one host sync
    classes = [(b, rows[b], lengths[b]) for b in range(max_buckets) if rows[b]]
    groups = cheapest_grouping([(r, n) for _, r, n in classes], call_overhead_slots)
    if len(groups) == 1:  # one call holds everyone: the padded layout, no member copy
        return [_one_padded_batch(seq, rank, present, sum(rows), max(lengths))]
    group_of_class = [0] * max_buckets
    for g, members in enumerate(groups):
        for c in members:
            group_of_class[classes[c][0]] = g
    group = torch.tensor(group_of_class, device=counts.device)[bucket]
    # Row of each sequence inside its group: rank among the present sequences of the same group.
    in_group = torch.nn.functional.one_hot(group, len(groups)) * present[:, None]
    row_of_seq = (torch.cumsum(in_group, 0) - in_group).gather(1, group[:, None]).squeeze(1)
    group_of_token = group[seq]
    layouts = []
    for g, members in enumerate(groups):
        token_members = (group_of_token == g).nonzero().squeeze(1)
        layouts.append(
            Layout(
                members=token_members,
                rows=row_of_seq[seq[token_members]],
                cols=rank[token_members],
                num_rows=sum(classes[c][1] for c in members),
                length=max(classes[c][2] for c in members),
            )
        )
    return layouts


def cheapest_grouping(classes: list[tuple[int, int]], call_overhead_slots: int) -> list[list[int]]:
    """Split length classes (rows, length), longest first, into runs of adjacent classes that each
    become one stage call, minimising padded slots + ``call_overhead_slots`` per call. Returns the
    runs as lists of class positions. Ties keep more calls (less padding); with no overhead every
    class stays apart."""
    best_cost, best = None, None
    for cuts in range(1 << max(len(classes) - 1, 0)):  # bit i set: a new call starts after class i
        groups, current = [], [0]
        for i in range(1, len(classes)):
            if cuts >> (i - 1) & 1:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        cost = sum(sum(classes[c][0] for c in g) * classes[g[0]][1] for g in groups) + call_overhead_slots * len(groups)
        if best_cost is None or cost < best_cost or (cost == best_cost and len(groups) > len(best)):
            best_cost, best = cost, groups
    return best


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
