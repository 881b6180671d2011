"""The ``cascade-bench`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .presets import STAGE_PRESETS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench-routing",
        help="time full cascade vs routed (padded, bucketed) vs masked early exit at forced exit ratios",
        description="Full cascade vs routed early exit vs masked early exit on one batch of real text, "
                    "exit ratio after stage 0 forced by calibration; wall time, counted FLOPs, peak memory, "
                    "all ratios from one run.")
    bench.add_argument("--preset", default="gpt2-cpu", choices=sorted(STAGE_PRESETS))
    bench.add_argument("--layers", type=_positive_int, nargs="+", default=[4, 4], help="layers per stage")
    bench.add_argument("--batch-size", type=_positive_int, default=8)
    bench.add_argument("--seq-len", type=_positive_int, default=512)
    bench.add_argument("--exit-ratios", type=_ratio, nargs="+", default=[0.25, 0.5, 0.75])
    bench.add_argument("--exit-fn", default="max_prob", choices=["max_prob", "cos_sim", "margin", "neg_entropy"])
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--repeats", type=_positive_int, default=7)
    bench.add_argument("--threads", type=_positive_int, default=2)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", type=Path, default=Path("results/bench-routing.json"),
                       help="where to write rows, checks and conditions (atomically); default %(default)s")
    return parser


def _bench_routing(args: argparse.Namespace) -> int:
    from .routing_bench import format_table, run_routing_bench

    if len(args.layers) < 2:
        raise ValueError(f"--layers needs at least two stages for early exit, got {args.layers}")
    rows, checks, conditions = run_routing_bench(
        preset=args.preset, layers=args.layers, batch_size=args.batch_size, seq_len=args.seq_len,
        exit_ratios=args.exit_ratios, exit_fn=args.exit_fn, warmup=args.warmup, repeats=args.repeats,
        threads=args.threads, seed=args.seed, json_path=args.json)
    print(f"\n{args.preset} {'+'.join(map(str, args.layers))} layers, batch {args.batch_size} x {args.seq_len}, "
          f"{conditions['dtype']} on {conditions['device']} ({conditions['threads']} threads), "
          f"exit_fn {args.exit_fn}, median of {args.repeats}\n")
    print(format_table(rows))
    print()
    for text, met in checks:
        print(f"[{'met' if met else 'MISSED'}] {text}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "bench-routing":
            return _bench_routing(args)
    except ValueError as error:
        print(f"cascade-bench: error: {error}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
