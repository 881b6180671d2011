"""The conditions a result was obtained under (docs/design.md section 2, item 5)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from .allocator import allocator_setting
from .lockfile import lock_status


def git_commit(path: Optional[Path] = None) -> str:
    """Commit of the cascade_bench checkout (with '+dirty' if it has changes), or 'unknown'."""
    where = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def available_devices() -> list[str]:
    """Device types this torch build can use on this machine."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append(f"cuda (x{torch.cuda.device_count()})")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: "str | torch.device", dtype: "str | torch.dtype" = "float32") -> torch.device:
    """``device`` as a torch.device once it is known to exist here and to hold ``dtype``; otherwise
    ValueError in one line naming the value and what is available (no driver traceback)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device {device!r} is not a device name ({error}); available: {', '.join(available_devices())}"
        ) from None
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    torch_dtype = getattr(torch, name, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; expected e.g. 'float32', 'bfloat16' or 'float16'")
    unavailable = {
        "cuda": not torch.cuda.is_available(),
        "mps": not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
    }
    if unavailable.get(resolved.type, False):
        why = (
            "torch was built without CUDA"
            if resolved.type == "cuda" and torch.version.cuda is None
            else f"no {resolved.type.upper()} device is available"
        )
        raise ValueError(
            f"device {str(device)!r} is not available here ({why}); available: {', '.join(available_devices())}"
        )
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {str(device)!r} does not exist; this machine has {torch.cuda.device_count()} "
            f"CUDA device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    if resolved.type == "cuda" and resolved.index is None and _torchrun_local_rank() is not None:
        # under torchrun each rank uses the GPU of its LOCAL_RANK: set it before anything touches
        # CUDA, or every rank opens a context on GPU 0 first
        torch.cuda.set_device(_torchrun_local_rank())
    try:  # one small product in the dtype: what every stage runs
        probe = torch.ones(2, 2, dtype=torch_dtype, device=resolved)
        (probe @ probe).sum().item()
    except (RuntimeError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"dtype {name!r} is not supported on device {str(device)!r} here ({first}); use 'float32'"
        ) from None
    return resolved


def _torchrun_local_rank() -> "int | None":
    """This process's LOCAL_RANK when torchrun launched several (WORLD_SIZE > 1), else None."""
    import os

    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return None  # join_launch names the bad value
    return local_rank if world_size > 1 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``/proc/cpuinfo``'s "model name" on Linux), else
    what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The vector instruction set torch's CPU kernels dispatch to here (``AVX512``, ``AVX2``,
    ``DEFAULT``, ...; ``ATEN_CPU_CAPABILITY`` lowers it): floating-point reductions, and so the last
    digits of every CPU result, depend on it."""
    getter = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return getter() if getter is not None else "unknown"


def environment_conditions(device: "torch.device | str", dtype: torch.dtype) -> dict:
    """Device, dtype, threads, the CPU (model and the vector ISA torch uses) and library versions as a
    flat dict of plain values."""
    import transformers

    device = torch.device(device)
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "allocator": allocator_setting(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "install": lock_status(),
        "git_commit": git_commit(),
    }
