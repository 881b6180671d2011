"""Benchmark presets, fixed threads, real text.

pytest benchmarks/ --benchmark-only                           # CPU preset
pytest benchmarks/ --benchmark-only --cascade-preset gpu      # GPU preset, on a CUDA machine
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from cascade_bench.data.corpus import embedded_documents
from cascade_bench.measure.allocator import retain_freed_memory
from cascade_bench.stages.presets import build_blocks, build_ensemble

THREADS = 2
retain_freed_memory()  # as the cascade-bench commands do (measure.allocator)


@dataclass(frozen=True)
class BenchPreset:
    """Stage preset, layers per stage, batch shapes (B, T), device and dtype."""

    stage_preset: str
    layers: tuple
    shapes: tuple
    device: str
    dtype: torch.dtype
    block_layers: tuple = (4, 4, 4)


BENCH_PRESETS = {
    # The core issue's CPU preset: GPT-2-style 4+4 layers, hidden 256, vocab 8192; two batch shapes.
    # Blocks: one 12-layer model of the stage preset split 4/4/4 (the blocks issue's CPU preset).
    "cpu": BenchPreset("gpt2-cpu", (4, 4), ((8, 512), (32, 128)), "cpu", torch.float32),
    # GPT-2-small-like 6+6 layers, hidden 768, vocab 50257, batch 16 x 1024 (and 64 x 256), bf16.
    "gpu": BenchPreset("gpt2-small", (6, 6), ((16, 1024), (64, 256)), "cuda", torch.bfloat16),
}


def pytest_addoption(parser):
    parser.addoption(
        "--cascade-preset",
        default="cpu",
        choices=sorted(BENCH_PRESETS),
        help="benchmark model sizes: cpu (default) or gpu (GPT-2-small-like stages, bf16, CUDA)",
    )


@pytest.fixture(scope="session")
def bench_preset(request) -> BenchPreset:
    preset = BENCH_PRESETS[request.config.getoption("--cascade-preset")]
    if preset.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("the gpu preset needs a CUDA device")
    torch.set_num_threads(THREADS)
    return preset


@pytest.fixture(scope="session")
def cascades(bench_preset):
    """(routed cascade, dense model of the same total depth), untrained (timing and FLOPs only)."""
    p = bench_preset
    cascade = build_ensemble(p.stage_preset, p.layers, seed=0, device=p.device, dtype=p.dtype)
    dense = build_ensemble(p.stage_preset, (sum(p.layers),), seed=1, device=p.device, dtype=p.dtype)
    return cascade, dense


@pytest.fixture(scope="session")
def text() -> str:
    return "\n\n".join(body for _, body in embedded_documents())


@pytest.fixture(scope="session")
def blocks(bench_preset):
    """One untrained model of sum(block_layers) layers cut into blocks (timing and FLOPs only)."""
    p = bench_preset
    return build_blocks(p.stage_preset, p.block_layers, seed=0, device=p.device, dtype=p.dtype)
