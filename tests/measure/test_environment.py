"""What every record says of the machine: the CPU model and the vector ISA torch's kernels use."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from cascade_bench.measure.environment import cpu_isa, cpu_model, environment_conditions


def test_every_record_names_the_cpu_and_the_isa_torch_uses():
    conditions = environment_conditions("cpu", torch.float32)
    assert conditions["cpu_model"] == cpu_model() and conditions["cpu_model"]
    assert conditions["cpu_isa"] == torch.backends.cpu.get_cpu_capability()


def test_the_isa_is_the_one_torch_dispatches_to_not_the_one_the_cpu_has():
    """ATEN_CPU_CAPABILITY lowers what torch uses (how a run is reproduced as on an older CPU): the
    record must say what ran."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    code = "from cascade_bench.measure.environment import cpu_isa; print(cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "DEFAULT"
    assert cpu_isa() != "unknown"
