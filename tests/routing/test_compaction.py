"""Gather/scatter layouts on hand-made routing decisions."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.data.batch import IGNORE_INDEX, next_token_targets
from cascade_bench.routing.compaction import (
    cheapest_grouping,
    from_dense,
    plan_layouts,
    rank_in_sequence,
    scatter_members,
    to_dense,
)

# B=3 sequences of T=4: sequence 0 keeps t=0,1; sequence 1 keeps t=1; sequence 2 keeps all four.
REACH = torch.tensor([0, 1, 5, 8, 9, 10, 11])


def test_rank_and_counts():
    seq, rank, counts = rank_in_sequence(REACH, seq_len=4, batch_size=3)
    assert seq.tolist() == [0, 0, 1, 2, 2, 2, 2]
    assert rank.tolist() == [0, 1, 0, 0, 1, 2, 3]
    assert counts.tolist() == [2, 1, 4]


def test_padded_layout_keeps_order_and_reports_padding():
    (layout,) = plan_layouts(REACH, 4, 3, "padded")
    assert (layout.num_rows, layout.length, layout.slots) == (3, 4, 12)
    assert layout.rows.tolist() == [0, 0, 1, 2, 2, 2, 2]
    assert layout.cols.tolist() == [0, 1, 0, 0, 1, 2, 3]
    values = (REACH * 10).float()[:, None]
    dense = to_dense(values, layout, fill=-1)
    assert dense[..., 0].tolist() == [[0, 10, -1, -1], [50, -1, -1, -1], [80, 90, 100, 110]]
    assert torch.equal(from_dense(dense, layout), values)


def test_rows_without_tokens_are_dropped():
    (layout,) = plan_layouts(torch.tensor([8, 10]), 4, 3, "padded")
    assert (layout.num_rows, layout.length) == (1, 2)
    assert layout.rows.tolist() == [0, 0] and layout.cols.tolist() == [0, 1]


def test_bucketed_layout_groups_by_length_and_round_trips():
    # lengths 2, 1, 4 with tolerance 0.15: each in its own length class (4 / 2 = 2 > 1.15)
    layouts = plan_layouts(REACH, 4, 3, "bucketed", max_buckets=4, bucket_tolerance=0.15, call_overhead_slots=0)
    shapes = sorted((lay.num_rows, lay.length) for lay in layouts)
    assert shapes == [(1, 1), (1, 2), (1, 4)]
    assert sum(lay.slots for lay in layouts) == REACH.numel()  # no padding at all
    values = torch.arange(7.0)[:, None] * torch.ones(1, 3)
    rebuilt = torch.zeros_like(values)
    for layout in layouts:
        scatter_members(rebuilt, layout, from_dense(to_dense(values, layout), layout))
    assert torch.equal(rebuilt, values)


def test_bucketed_layout_merges_rows_within_tolerance():
    # counts 10, 9, 3 with tolerance 0.15: 10/9 < 1.15 -> same bucket; 3 alone
    reach = torch.cat([torch.arange(10), 16 + torch.arange(9), 32 + torch.arange(3)])
    layouts = plan_layouts(reach, 16, 3, "bucketed", bucket_tolerance=0.15, call_overhead_slots=0)
    assert sorted((lay.num_rows, lay.length) for lay in layouts) == [(1, 3), (2, 10)]


def test_a_merge_happens_when_its_padding_costs_less_than_the_call_it_saves():
    # counts 10, 9, 3 (classes (2 rows, 10) and (1 row, 3)): apart 20 + 3 = 23 slots in two calls,
    # merged 3 x 10 = 30 slots in one. Merged when a call costs more than the 7 padding slots.
    reach = torch.cat([torch.arange(10), 16 + torch.arange(9), 32 + torch.arange(3)])
    apart = plan_layouts(reach, 16, 3, "bucketed", bucket_tolerance=0.15, call_overhead_slots=7)
    assert sorted((lay.num_rows, lay.length) for lay in apart) == [(1, 3), (2, 10)]  # a tie keeps the calls
    (merged,) = plan_layouts(reach, 16, 3, "bucketed", bucket_tolerance=0.15, call_overhead_slots=8)
    (padded,) = plan_layouts(reach, 16, 3, "padded")
    assert (merged.num_rows, merged.length) == (3, 10) and merged.members is None
    assert torch.equal(merged.rows, padded.rows) and torch.equal(merged.cols, padded.cols)


def test_cheapest_grouping_by_hand():
    # classes longest first: (rows, length) = (1, 100), (4, 60), (4, 50), (8, 10)
    classes = [(1, 100), (4, 60), (4, 50), (8, 10)]
    # no overhead: every class its own call (100 + 240 + 200 + 80 = 620 slots)
    assert cheapest_grouping(classes, 0) == [[0], [1], [2], [3]]
    # overhead 50: merging 60 and 50 adds 40 slots and saves 50 -> 660 + 150 = 810 beats 620 + 200 = 820;
    # the 100-row merged with both: 9 x 100 = 900 (+ 100 + 80 + 100) is worse
    assert cheapest_grouping(classes, 50) == [[0], [1, 2], [3]]
    # overhead 1000: everything in one call (17 x 100 = 1,700 + 1,000 beats any split)
    assert cheapest_grouping(classes, 1000) == [[0, 1, 2, 3]]
    assert cheapest_grouping([(3, 7)], 10) == [[0]]


def test_merged_groups_round_trip_in_order():
    # lengths 16, 15, 8, 7, 2 on B=5, T=16: tolerance 0.05 gives several classes; a middle overhead
    # merges some of them; every token still goes out and comes back to its place
    counts = [16, 15, 8, 7, 2]
    reach = torch.cat([16 * b + torch.arange(n) for b, n in enumerate(counts)])
    values = torch.randn(reach.numel(), 3)
    for overhead in (0, 4, 16, 1000):
        layouts = plan_layouts(reach, 16, 5, "bucketed", bucket_tolerance=0.05, call_overhead_slots=overhead)
        rebuilt = torch.zeros_like(values)
        for layout in layouts:
            scatter_members(rebuilt, layout, from_dense(to_dense(values, layout), layout))
        assert torch.equal(rebuilt, values)
        assert sum(lay.num_rows for lay in layouts) == 5
        for layout in layouts:  # each row holds one sequence's tokens left-aligned, in order
            assert layout.cols.max() < layout.length and layout.rows.max() < layout.num_rows
    assert len(plan_layouts(reach, 16, 5, "bucketed", bucket_tolerance=0.05, call_overhead_slots=1000)) == 1
    assert len(plan_layouts(reach, 16, 5, "bucketed", bucket_tolerance=0.05, call_overhead_slots=0)) > 2


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_a_bad_call_overhead_is_refused(bad):
    with pytest.raises(ValueError, match="call_overhead_slots"):
        plan_layouts(REACH, 4, 3, "bucketed", call_overhead_slots=bad)


def test_dense_layout_is_a_reshape():
    for batching in ("padded", "bucketed"):
        (layout,) = plan_layouts(torch.arange(12), 4, 3, batching)
        assert layout.is_dense and (layout.num_rows, layout.length) == (3, 4)
        # every slot of the grid, row by row: the rows and columns a full layout's readers index with
        assert layout.rows.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and layout.cols.tolist() == [0, 1, 2, 3] * 3
    values = torch.randn(12, 2)
    assert to_dense(values, layout).data_ptr() == values.data_ptr()


def test_next_token_targets_with_padding_on_either_side():
    ids = torch.tensor([[5, 6, 7, 0], [0, 0, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    targets = next_token_targets(ids, mask)
    ignore = IGNORE_INDEX
    assert targets.tolist() == [[6, 7, ignore, ignore], [ignore, ignore, 9, ignore]]
    assert next_token_targets(ids).tolist() == [[6, 7, 0, ignore], [0, 8, 9, ignore]]


def test_the_call_overhead_can_be_set_from_the_environment(monkeypatch):
    from cascade_bench.routing.compaction import CALL_OVERHEAD_ENV, _call_overhead_from_environment

    monkeypatch.setenv(CALL_OVERHEAD_ENV, "32")
    assert _call_overhead_from_environment() == 32
    monkeypatch.setenv(CALL_OVERHEAD_ENV, "")
    assert _call_overhead_from_environment(default=128) == 128
    monkeypatch.setenv(CALL_OVERHEAD_ENV, "-4")
    with pytest.raises(ValueError, match=r"CASCADE_BENCH_CALL_OVERHEAD_SLOTS='-4'.*int >= 0"):
        _call_overhead_from_environment()


def _slots_and_calls(layouts) -> int:
    return sum(layout.slots for layout in layouts), len(layouts)


def test_one_call_whenever_its_padding_costs_less_than_a_second_call():
    # counts 16, 2 on T=16: one call pads 14 slots; apart 16 + 2 slots in two calls. With a call worth
    # 15 slots one call wins (32 + 15 < 18 + 30) however far apart the lengths are; worth 14, a tie
    # in cost, keeps both calls (less padding), as cheapest_grouping does.
    reach = torch.cat([torch.arange(16), 16 + torch.arange(2)])
    assert _slots_and_calls(plan_layouts(reach, 16, 2, "bucketed", call_overhead_slots=15)) == (32, 1)
    assert _slots_and_calls(plan_layouts(reach, 16, 2, "bucketed", call_overhead_slots=14)) == (18, 2)


def test_the_planned_layouts_cost_no_more_than_any_grouping_of_their_length_classes():
    # Random routing decisions: slots + overhead x calls of the plan is the cheapest grouping's cost
    # over the length classes (the one-call shortcut never picks a dearer layout than the search).
    from cascade_bench.routing import compaction

    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        batch, seq_len = 1 + trial % 9, 4 + trial % 29
        keep = torch.rand(batch * seq_len, generator=generator) < torch.rand(
            batch, generator=generator
        ).repeat_interleave(seq_len)
        reach = keep.nonzero().squeeze(1)
        if reach.numel() == 0:
            continue
        overhead = int(torch.randint(0, 3 * seq_len, (1,), generator=generator))
        slots, calls = _slots_and_calls(plan_layouts(reach, seq_len, batch, "bucketed", call_overhead_slots=overhead))
        seq, rank, counts = rank_in_sequence(reach, seq_len, batch)
        searched = compaction._bucketed_layouts(seq, rank, counts, 4, 0.15, overhead)
        best_slots, best_calls = _slots_and_calls(searched)
        assert slots + overhead * calls <= best_slots + overhead * best_calls, (trial, overhead)
        assert slots >= reach.numel()
