"""Shared fixtures: deterministic seeds and the embedded real text."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.data.corpus import embedded_documents


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _every_length_class_its_own_call():
    """Tiny test batches are far below a stage call's fixed cost, so bucketed batching would merge them
    into one call (``compaction.CALL_OVERHEAD_SLOTS``) and every bucketed test would rerun the padded
    path. Tests keep each length class apart (several calls per stage) unless they pass
    ``call_overhead_slots``; the merging has its own tests (test_compaction, test_invariants)."""
    with pytest.MonkeyPatch.context() as patch:  # session-wide, so module-scoped fixtures run under it too
        patch.setattr("cascade_bench.routing.compaction.CALL_OVERHEAD_SLOTS", 0)
        patch.setenv("CASCADE_BENCH_CALL_OVERHEAD_SLOTS", "0")  # and the CLI processes tests start
        yield


@pytest.fixture(scope="session")
def text() -> str:
    return "\n\n".join(body for _, body in embedded_documents())
