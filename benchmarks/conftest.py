"""Benchmarks run with the CPU preset, a fixed thread count and real text."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.corpus import byte_token_windows, embedded_documents
from cascade_bench.presets import build_ensemble

THREADS = 2


@pytest.fixture(scope="session")
def cpu_preset():
    """The core issue's CPU preset: GPT-2-style 4+4 layers, hidden 256, vocab 8192, batch 8 x 512."""
    torch.set_num_threads(THREADS)
    ensemble = build_ensemble("gpt2-cpu", (4, 4), seed=0).eval()
    text = "\n\n".join(body for _, body in embedded_documents())
    return ensemble, byte_token_windows(text, 8, 512)
