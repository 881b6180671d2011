"""The conditions a result was obtained under (DESIGN.md section 2, item 5)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch


def git_commit(path: Optional[Path] = None) -> str:
    """Commit of the cascade_bench checkout (with '+dirty' if it has changes), or 'unknown'."""
    where = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def environment_conditions(device: "torch.device | str", dtype: torch.dtype) -> dict:
    """Device, dtype, threads and library versions as a flat dict of plain values."""
    import transformers

    device = torch.device(device)
    return {
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }
