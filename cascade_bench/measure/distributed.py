"""Data-parallel evaluation across the processes of one ``torchrun`` launch (torch.distributed).

``join_launch()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and, with
more than one process, joins the process group (gloo on CPU, NCCL on CUDA, each rank on its own
GPU). Inside ``sharded(ranks)`` the toolkit's evaluation functions (``routing.evaluate``,
``calibrate_thresholds``, ``risk_controlled_thresholds``, ``oracle_bound``, ``cost.measure_cost``)
still take the whole list of batches, run their share of it (``shard``: batch i on rank
i mod world size), and combine the shares on every rank:

- counts and sums exactly: Python ints, and float64 sums added in rank order (``summed``);
- per-token values (confidences for a calibration quantile) gathered whole, in batch order, so a
  threshold is the exact order statistic of all tokens (``gathered``);
- times and peak memory as the slowest / largest rank's (a data-parallel pass ends with its
  slowest rank; memory is per process).

The algorithms themselves never name a rank: a per-token quantity over batches goes through
``concatenated`` and additive totals through ``totals`` (each shards its loop and combines its
result: the two edges); only the measurement of time and memory, the evaluation totals of
``routing.evaluation.Totals`` and risk control's per-share reference pass combine explicitly.

Outside ``sharded`` (and in one process) nothing is sharded or combined: training runs on one
process (``main_first``: rank 0 trains and saves, the others wait and then load what it saved).
Every rank must make the same calls in the same order inside ``sharded``, as ``run`` does.
"""

from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Sequence

import torch

#: How long a rank waits at a barrier for rank 0 (which may be training a cascade meanwhile).
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a launch: rank, world size and backend (one process: 0, 1, "")."""

    rank: int = 0
    world_size: int = 1
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def summary(self) -> dict:
        return {"ranks": self.world_size, "backend": self.backend or None}


ONE_PROCESS = Ranks()
_SHARDED: contextvars.ContextVar[Ranks] = contextvars.ContextVar("cascade_bench_sharded", default=ONE_PROCESS)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (set by torchrun), got {value!r}") from None


def join_launch(device: str = "cpu") -> Ranks:
    """This process's ``Ranks`` under torchrun (``ONE_PROCESS`` without it). With several processes,
    initialises the default process group once: NCCL when ``device`` is CUDA (and sets this rank's
    GPU to ``LOCAL_RANK``), gloo otherwise."""
    import torch.distributed as dist

    world_size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"torchrun environment: RANK {rank} must be in 0..WORLD_SIZE-1 (WORLD_SIZE {world_size})")
    if world_size == 1:
        return ONE_PROCESS
    if not dist.is_available():
        raise ValueError(
            f"WORLD_SIZE={world_size} asks for {world_size} processes, but this torch build has no torch.distributed"
        )
    cuda = torch.device(device).type == "cuda"
    if cuda and torch.device(device).index is not None:
        raise ValueError(
            f"under torchrun give device 'cuda' (each rank uses the GPU of its LOCAL_RANK), got {device!r}"
        )
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), backend=dist.get_backend())


@contextmanager
def sharded(ranks: Ranks):
    """Evaluation functions called inside shard their batches over ``ranks`` and combine the results."""
    token = _SHARDED.set(ranks)
    try:
        yield ranks
    finally:
        _SHARDED.reset(token)


@contextmanager
def unsharded():
    """Inside ``sharded``, a block whose evaluations run whole on this process (training on rank 0)."""
    token = _SHARDED.set(ONE_PROCESS)
    try:
        yield
    finally:
        _SHARDED.reset(token)


def current_ranks() -> Ranks:
    """The ranks evaluation is sharded over now (``ONE_PROCESS`` outside ``sharded``)."""
    return _SHARDED.get()


def shard(batches: Iterable) -> "Sequence | Iterable":
    """This rank's share of ``batches`` (batch i on rank i mod world size); all of them when not sharded.
    Every rank needs at least one batch (ValueError otherwise, raised alike on every rank)."""
    ranks = current_ranks()
    if not ranks.parallel:
        return batches
    items = list(batches)
    if len(items) < ranks.world_size:
        raise ValueError(
            f"cannot shard {len(items)} batches over {ranks.world_size} ranks: every rank needs at "
            f"least one batch (use fewer processes or more batches)"
        )
    return items[ranks.rank :: ranks.world_size]


def first_share(n: int) -> int:
    """How many of the first ``n`` batches are this rank's (they lead its share); ``n`` when not sharded."""
    ranks = current_ranks()
    if not ranks.parallel:
        return n
    if n < ranks.world_size:
        raise ValueError(
            f"cannot time the first {n} batches over {ranks.world_size} ranks: every rank needs at "
            f"least one (set timing_batches to at least {ranks.world_size}, or 0 for all)"
        )
    return len(range(ranks.rank, n, ranks.world_size))


def all_ranks(value: Any) -> list:
    """``value`` from every rank, in rank order (``[value]`` when not sharded). Picklable values."""
    ranks = current_ranks()
    if not ranks.parallel:
        return [value]
    import torch.distributed as dist

    values: list = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


def summed(values: Sequence) -> list:
    """Element-wise sums across ranks of a list of numbers (ints stay exact ints; floats are summed
    in float64, in rank order, so every rank gets the same result)."""
    per_rank = all_ranks(list(values))
    return [sum(column) for column in zip(*per_rank)]


def largest(value: float) -> float:
    """The largest ``value`` over ranks (times of a data-parallel pass, per-process peak memory)."""
    return max(all_ranks(value))


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """1-D ``tensor`` of every rank, concatenated in rank order (on the CPU). Per-token values for an
    order statistic (a calibration quantile), which does not depend on their order; two tensors
    gathered from the same passes stay aligned token by token."""
    parts = all_ranks(tensor.detach().cpu())
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def concatenated(per_batch: Callable[[Any], Any], batches: Iterable, what: str = "this") -> Any:
    """Per-token values over every batch: ``per_batch(item)`` gives a 1-D tensor (or a tuple of
    them) per batch; the result is their concatenation (per position of the tuple) over all the
    batches, on the CPU. Inside ``sharded`` each rank runs its share and gets everyone's values
    (``gathered``), so an algorithm written with it never sees a rank. ValueError with no batches
    (``what`` names the caller in it)."""
    parts = [per_batch(item) for item in shard(batches)]
    if not parts:
        raise ValueError(f"{what} got no batches")
    if isinstance(parts[0], tuple):
        return tuple(gathered(torch.cat(column)) for column in zip(*parts))
    return gathered(torch.cat(parts))


def totals(per_batch: Callable[[Any], Sequence], batches: Iterable, what: str = "this") -> list:
    """Element-wise sums over every batch of ``per_batch(item)`` (a list of numbers per batch; ints
    stay exact): over all ranks' shares inside ``sharded`` (``summed``), so the algorithm never
    sees a rank. ValueError with no batches (``what`` names the caller in it)."""
    columns = None
    for item in shard(batches):
        values = list(per_batch(item))
        columns = values if columns is None else [a + b for a, b in zip(columns, values, strict=True)]
    if columns is None:
        raise ValueError(f"{what} got no batches")
    return summed(columns)


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (its own when not sharded)."""
    ranks = current_ranks()
    if not ranks.parallel:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def same_parameters(modules: Iterable) -> None:
    """Copy rank 0's parameters and buffers into ``modules`` on every rank (no-op when not sharded):
    what each rank trained alike is then bitwise the same."""
    ranks = current_ranks()
    if not ranks.parallel:
        return
    import torch.distributed as dist

    for module in modules:
        if isinstance(module, torch.nn.Module):
            with torch.no_grad():
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, src=0)


def leave_launch() -> None:
    """Leave the process group ``join_launch`` joined, every rank together (no-op in one process):
    rank 0 still writes the report when the others are done, and a rank that tore the group down
    while a peer was still connected was seen to abort (``terminate called without an active
    exception`` in one CI run of the two-rank test)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def main_first(ranks: Ranks):
    """Rank 0 runs the block first (e.g. trains and saves a model, writes a tokenizer cache); the
    others wait at a barrier, then run it (finding what rank 0 saved). No evaluation inside is sharded."""
    import torch.distributed as dist

    if ranks.parallel and not ranks.is_main:
        dist.barrier()
    with unsharded():
        yield
    if ranks.parallel and ranks.is_main:
        dist.barrier()
