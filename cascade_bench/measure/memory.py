"""Peak memory of a forward pass.

- CUDA: ``torch.cuda.max_memory_allocated`` around the call.
- CPU: process RSS is allocator-dependent and monotonic, so it cannot compare two passes run in
  one process. :class:`PeakTensorBytes` instead follows every tensor storage that aten ops
  create during the call (a ``TorchDispatchMode``), frees it when its last tensor dies, and
  reports the peak of bytes alive at once. Tensors that existed before the call (weights,
  inputs) are not counted; storages held only inside C++ kernels (workspaces) are not seen, so
  the figure is a lower bound on the activation peak, exact for what PyTorch exposes as tensors.
  Like FLOP counting, it runs in its own pass, never inside a timed one.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorBytes(TorchDispatchMode):
    """Tracks bytes of tensor storages created inside the mode; ``peak`` is the maximum alive at once."""

    def __init__(self):
        super().__init__()
        self.alive = 0
        self.peak = 0
        self._storages: dict[int, list] = {}  # data_ptr -> [nbytes, live tensor count]

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.alive -= entry[0]
            del self._storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or (key in inputs and key not in self._storages):
                continue  # a view of, or in-place write into, memory that existed before the call
            if key not in self._storages:
                self._storages[key] = [nbytes, 0]
                self.alive += nbytes
                self.peak = max(self.peak, self.alive)
            self._storages[key][1] += 1
            weakref.finalize(t, self._release, key)
        return out


def peak_memory_bytes(fn: Callable[[], object], device: "torch.device | str" = "cpu") -> tuple[int, str, object]:
    """Peak memory of one call ``fn()`` on ``device``: (bytes, how it was measured, fn's result)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "cuda_max_allocated", result
    tracker = PeakTensorBytes()
    with tracker:
        result = fn()
    return tracker.peak, "peak_live_tensor_bytes", result
