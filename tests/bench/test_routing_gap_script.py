"""benchmarks/routing_gap.py regroups a run's timed windows without changing them."""

from __future__ import annotations

import torch

from benchmarks.routing_gap import regrouped


def test_regrouped_windows_are_the_same_windows_in_bigger_batches():
    batches = [
        {"input_ids": torch.arange(6).view(2, 3) + 10 * b, "targets": torch.arange(6).view(2, 3) - b} for b in range(3)
    ]
    batches[1]["attention_mask"] = None  # a key a batch lacks is not carried
    again = regrouped(batches, 4)
    assert [tuple(batch["input_ids"].shape) for batch in again] == [(4, 3), (2, 3)]
    assert set(again[0]) == {"input_ids", "targets"}
    for key in ("input_ids", "targets"):
        assert torch.equal(torch.cat([b[key] for b in again]), torch.cat([b[key] for b in batches]))
