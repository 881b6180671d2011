"""The allocator setting: freed blocks stay in the process (no page faults per pass), opt-out, bad values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cascade_bench.measure import allocator

# Routed passes of the default run's stage shape (gpt2-mini, 8 x 128 tokens) in a fresh process; print
# the median minor page faults of passes 3 to 12 (the first ones fault the heap in once).
_PROGRAM = """
import resource, sys, torch
from cascade_bench.measure.allocator import retain_freed_memory
print(retain_freed_memory(sys.argv[1]))
from cascade_bench.routing.passes import forward_cascade
from cascade_bench.stages.presets import build_ensemble
torch.manual_seed(0)
torch.set_num_threads(1)
cascade = build_ensemble("gpt2-mini", [2, 2]).eval()
ids = torch.randint(0, 1024, (8, 128))
faults = []
with torch.inference_mode():
    for i in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        forward_cascade(cascade, ids, thresholds=[0.01])
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults[2:])[5])
"""


def _faults(mode: str) -> tuple[str, int]:
    out = (
        subprocess.run(
            [sys.executable, "-c", _PROGRAM, mode],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        .stdout.strip()
        .splitlines()
    )
    return out[-2], int(out[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only: elsewhere the setting changes nothing")
def test_retained_blocks_are_reused_without_faulting_them_in_again():
    described, retained = _faults("retain")
    assert described.startswith("glibc malloc retains freed memory")
    system_described, system = _faults("system")
    assert system_described.startswith("system malloc defaults")
    # faults per pass: under the defaults the pass's large blocks are unmapped and faulted in again
    # (thousands of pages per pass when measured); retained, they are reused and most passes fault none
    assert system > 500
    assert retained < system / 20


def test_a_bad_mode_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(allocator.ENV_VARIABLE, "jemalloc")
    with pytest.raises(ValueError, match=r"CASCADE_BENCH_MALLOC='jemalloc'.*retain.*system"):
        allocator.retain_freed_memory()


def test_records_name_the_setting():
    from cascade_bench.measure.environment import environment_conditions

    assert environment_conditions("cpu", __import__("torch").float32)["allocator"] == allocator.allocator_setting()
