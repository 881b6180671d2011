"""``bench-memory``: how cost grows with context for the memory-layer family against a plain transformer."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.choices import MEMORY_PARTS, MEMORY_PRESETS
from .arguments import (
    positive_int,
)


def _add_bench_memory_command(commands) -> None:
    memory = commands.add_parser(
        "bench-memory",
        help="the memory-layer presets (sequential vs lagged chunk memories, cost vs context length, "
        "reversal curse) and Lagged Cache Training of a recurrent context model",
        description="The four memory-layer presets (pythia, infini, multi_memory, hierarchical) on the embedded "
        "corpus: training on chunked streams in stream order vs with lagged chunk memories (time per "
        "epoch, validation PPL); sliding-window PPL, counted FLOPs, wall time, peak memory and cache bytes "
        "per token from 256 to 8,192 tokens of context, with a plot; forward vs backward PPL on a "
        "one-to-one relation from the standard library (HTML entities). Part 'recurrent': Lagged Cache "
        "Training as its seed describes it (every position reads the previous pass's context at t-1) vs "
        "training through the recurrence, on one recurrent context model. Trained models are kept under "
        "--out and reused.",
    )
    memory.add_argument(
        "--parts",
        nargs="+",
        choices=list(MEMORY_PARTS),
        default=list(MEMORY_PARTS),
        help="which parts to run (context needs training)",
    )
    memory.add_argument(
        "--presets",
        nargs="+",
        choices=list(MEMORY_PRESETS),
        default=list(MEMORY_PRESETS),
        help="memory-layer families to measure (default: all four)",
    )
    memory.add_argument(
        "--contexts",
        type=positive_int,
        nargs="+",
        default=[256, 512, 1024, 2048, 4096, 8192],
        help="context lengths of the context part (tokens)",
    )
    memory.add_argument(
        "--max-epochs",
        type=positive_int,
        default=None,
        help="safety cap on epochs (default: 20 for training, 150 for reversal, 40 for recurrent; all stop early)",
    )
    memory.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default %(default)s)")
    memory.add_argument(
        "--out",
        type=Path,
        default=Path("memory_bench"),
        help="folder for models, results/ and plots/ (default %(default)s)",
    )


def _bench_memory(args: argparse.Namespace) -> int:
    import torch

    from ..bench.memory_family import run_memory_bench

    torch.set_num_threads(args.threads)
    for path in run_memory_bench(args.out, args.parts, args.presets, args.contexts, args.max_epochs).values():
        print(f"wrote {path}")
    return 0


def add_commands(commands) -> None:
    """Declare this module's commands on the ``cascade-bench`` sub-parsers."""
    _add_bench_memory_command(commands)


#: The handler of each command declared here.
HANDLERS = {
    "bench-memory": _bench_memory,
}
