"""Shared fixtures: deterministic seeds and the embedded real text."""

from __future__ import annotations

import logging

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


class _DeprecationLines(logging.Handler):
    """transformers' deprecations that arrive as log lines (``logger.warning``), not as warnings."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.lines.append(message)


@pytest.fixture(autouse=True)
def _no_transformers_deprecation_lines():
    """A deprecation transformers logs about a call of ours fails the test that made it, like the
    warnings pyproject's ``filterwarnings`` turns into errors (the warnings-as-errors setting never
    sees a log line)."""
    handler = _DeprecationLines()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
    assert not handler.lines, f"transformers logged a deprecation about our call: {handler.lines}"
