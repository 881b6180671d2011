"""Shared fixtures: deterministic seeds and the embedded real text."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.data.corpus import embedded_documents


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def text() -> str:
    return "\n\n".join(body for _, body in embedded_documents())
