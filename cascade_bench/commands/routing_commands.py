"""``cost``, ``bench-routing``, ``bench-blocks`` and ``bench-report``: the cost of one pass and the routing benches."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.choices import BENCH_RULES
from .arguments import (
    BUILTIN_RULE_CHOICES,
    HELP,
    add_cascade_args,
    add_json_arg,
    add_timing_args,
    build_cascade,
    fraction,
    positive_int,
    print_checks,
    run_header,
)


def _add_cost_command(commands) -> None:
    cost = commands.add_parser(
        "cost",
        help="full cost breakdown of one method over batches of the embedded text",
        description="Quality and cost of a cascade over batches of the embedded text (CPython documentation "
        "topics, UTF-8 bytes as token ids): counted FLOPs per stage and component, analytic and "
        "fvcore cross-checks, wall time and span times, peak memory, host syncs on CUDA.",
    )
    add_cascade_args(cost)
    cost.add_argument(
        "--method",
        default="routed",
        choices=["routed", "masked", "full"],
        help="routed early exit, masked early exit (compute then mask) or full depth (default %(default)s)",
    )
    cost.add_argument(
        "--batching",
        default="padded",
        choices=["padded", "bucketed"],
        help="how continuing tokens are batched for the next stage (default %(default)s)",
    )
    cost.add_argument(
        "--positions",
        default="compact",
        choices=["compact", "original"],
        help="positions of gathered tokens: renumbered or their original ones (default %(default)s)",
    )
    cost.add_argument(
        "--hard-ratio",
        type=fraction,
        default=0.5,
        help="fraction of tokens that continue past each stage, calibrated on separate batches",
    )
    cost.add_argument("--batch-size", type=positive_int, default=8, help=HELP["batch_size"])
    cost.add_argument("--seq-len", type=positive_int, default=512, help=HELP["seq_len"])
    cost.add_argument(
        "--num-batches", type=positive_int, default=2, help="batches of text measured (default %(default)s)"
    )
    add_timing_args(cost, warmup=1, repeats=5)
    cost.add_argument("--no-fvcore", action="store_true", help="skip the fvcore cross-check")
    add_json_arg(cost, "results/cost.json", "the record")


def _add_bench_routing_command(commands) -> None:
    bench = commands.add_parser(
        "bench-routing",
        help="time full cascade vs routed (padded, bucketed) vs masked early exit at forced hard ratios",
        description="Full cascade vs routed early exit vs masked early exit on one batch of real text, "
        "hard ratio after stage 0 forced by calibration; wall time, counted FLOPs, peak memory, "
        "all ratios from one run.",
    )
    add_cascade_args(bench)
    bench.add_argument("--batch-size", type=positive_int, default=8, help=HELP["batch_size"])
    bench.add_argument("--seq-len", type=positive_int, default=512, help=HELP["seq_len"])
    bench.add_argument(
        "--hard-ratios",
        type=fraction,
        nargs="+",
        default=[0.75, 0.5, 0.25],
        help="shares of tokens forced to continue past stage 0, one point each (default %(default)s)",
    )
    add_timing_args(bench, warmup=2, repeats=7)
    bench.add_argument(
        "--exit-rules",
        nargs="*",
        default=None,
        metavar="RULE",
        help=f"exit rules for the per-rule table, space-separated (none: skip it); default {' '.join(BENCH_RULES)} "
        "(a default one that does not fit the model is dropped with a note)",
    )
    bench.add_argument(
        "--profile",
        action="store_true",
        help="instead of the bench: where each pass spends its time, per stage and phase (layers, "
        "gather, exit head, exit rule, scatter, the rest), written beside --json as .profile.json",
    )
    add_json_arg(bench, "results/bench-routing.json", "rows, checks and conditions")


def _add_bench_blocks_command(commands) -> None:
    blocks = commands.add_parser(
        "bench-blocks",
        help="early exit inside one model: blocks vs the unsplit model, max_prob vs cos_sim",
        description="Blocks of one model (default: the gpt2-cpu preset as one 12-layer model split 4/4/4, or "
        "--model FOLDER --boundaries ...) against the unsplit model at several per-block hard ratios "
        "and exit rules: counted FLOPs (exit heads apart), layer cost, wall time back to back.",
    )
    add_cascade_args(blocks)
    blocks.set_defaults(layers=[4, 4, 4], as_blocks=True)
    blocks.add_argument(
        "--hard-ratios",
        type=fraction,
        nargs="+",
        default=[1.0, 0.75, 0.5, 0.25],
        help="fraction of the tokens reaching each non-last block that continue",
    )
    blocks.add_argument(
        "--exit-rules",
        dest="exit_rules",
        nargs="+",
        choices=BUILTIN_RULE_CHOICES,
        default=["max_prob", "cos_sim"],
        help="exit rules measured, one table block each (default %(default)s)",
    )
    blocks.add_argument("--batch-size", type=positive_int, default=8, help=HELP["batch_size"])
    blocks.add_argument("--seq-len", type=positive_int, default=512, help=HELP["seq_len"])
    add_timing_args(blocks, warmup=1, repeats=5)
    add_json_arg(blocks, "results/bench-blocks.json", "rows and conditions")


def _add_bench_report_command(commands) -> None:
    bench_report = commands.add_parser(
        "bench-report",
        help="tables and a cost-vs-time plot from a pytest-benchmark JSON file",
        description="Turn `pytest benchmarks/ --benchmark-only --benchmark-json FILE` into tables (Markdown, LaTeX, "
        "CSV) and a cost-vs-time plot.",
    )
    bench_report.add_argument("json_file", type=Path, help="the --benchmark-json file")
    bench_report.add_argument("--out", type=Path, default=Path("results"), help="folder for the outputs")


def _cost(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from ..cost.embedded import embedded_cost
    from ..cost.table import format_cost
    from ..data.storage import write_json_atomic

    ensemble, origin = build_cascade(args)
    record = embedded_cost(
        ensemble,
        origin,
        args.method,
        num_batches=args.num_batches,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        hard_ratio=args.hard_ratio,
        warmup=args.warmup,
        repeats=args.repeats,
        fvcore=not args.no_fvcore,
        batching=args.batching,
        positions=args.positions,
        seed=args.seed,
    )
    print(format_cost(record))
    if args.json is not None:
        write_json_atomic(args.json, asdict(record))
        print(f"\nwrote {args.json}")
    return 0


def _bench_routing(args: argparse.Namespace) -> int:
    from ..bench.routing import format_rule_table, format_table, run_routing_bench
    from ..stages.exit_rules import parse_rule_spec

    if args.profile:
        return _profile_routing(args)

    chosen = args.exit_rules is not None
    rules = [spec for spec in (args.exit_rules if chosen else BENCH_RULES) if spec.strip()]
    for spec in rules:
        parse_rule_spec(spec)
    ensemble, origin = build_cascade(args)
    rules = _fitting_rules(rules, ensemble, chosen)
    rows, checks, conditions, rule_rows = run_routing_bench(
        ensemble,
        str(origin),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        hard_ratios=args.hard_ratios,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        json_path=args.json,
        rules=rules,
    )
    timing = (f"exit_rule {args.exit_rule}", f"median of {args.repeats}")
    print(run_header(origin, conditions, (f"batch {args.batch_size} x {args.seq_len}",), timing))
    print(format_table(rows))
    if rule_rows:
        print("\nRouted early exit per exit rule (decision share: the decision's own FLOPs over the pass's):\n")
        print(format_rule_table(rule_rows))
    print()
    print_checks(checks)
    return 0


def _fitting_rules(rules: list[str], ensemble, chosen: bool) -> list[str]:
    """The rules that fit the cascade's narrowest exiting stage and its vocabulary: a default one that
    does not is dropped with a note; one the user chose stops the bench with what fits."""
    from ..experiment.model_fit import ModelSizes, rule_misfit

    sizes = ModelSizes(min(stage.hidden_size for stage in list(ensemble)[:-1]), ensemble.vocab_size)
    kept = []
    for spec in rules:
        why = rule_misfit(spec, sizes)
        if why is None:
            kept.append(spec)
        elif chosen:
            raise ValueError(f"--exit-rules {spec}: {why}; choose a size that fits or leave it out")
        else:
            print(f"note: the default exit rule {spec!r} dropped: {why}; --exit-rules chooses the rules")
    return kept


def _profile_routing(args: argparse.Namespace) -> int:
    from ..bench.routing_profile import format_profile, profile_path, run_routing_profile

    ensemble, origin = build_cascade(args)
    rows, conditions = run_routing_profile(
        ensemble,
        origin,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        hard_ratios=args.hard_ratios,
        warmup=args.warmup,
        repeats=args.repeats,
        json_path=args.json,
    )
    timing = (f"exit_rule {args.exit_rule}", f"milliseconds of the median of {args.repeats} repeats")
    print(run_header(origin, conditions, (f"batch {args.batch_size} x {args.seq_len}",), timing))
    for ratio in args.hard_ratios:
        print(f"hard ratio {ratio:g}:\n")
        print(format_profile([r for r in rows if r["hard ratio"] == ratio]) + "\n")
    if args.json is not None:
        print(f"wrote {profile_path(args.json)}")
    return 0


def _bench_blocks(args: argparse.Namespace) -> int:
    from ..bench.model_blocks import format_block_table, run_block_bench

    ensemble, origin = build_cascade(args)
    rows, conditions = run_block_bench(
        ensemble,
        origin,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        hard_ratios=args.hard_ratios,
        exit_rules=args.exit_rules,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        json_path=args.json,
    )
    shape = (f"batch {args.batch_size} x {args.seq_len}",)
    print(run_header(origin, conditions, shape, (f"median of {args.repeats}",)))
    print(format_block_table(rows))
    return 0


def _bench_report(args: argparse.Namespace) -> int:
    from ..bench.report import write_bench_report

    if not args.json_file.is_file():
        raise ValueError(f"missing benchmark JSON {args.json_file}")
    for path in write_bench_report(args.json_file, args.out):
        print(f"wrote {path}")
    return 0


def add_commands(commands) -> None:
    """Declare this module's commands on the ``cascade-bench`` sub-parsers."""
    _add_cost_command(commands)
    _add_bench_routing_command(commands)
    _add_bench_blocks_command(commands)
    _add_bench_report_command(commands)


#: The handler of each command declared here.
HANDLERS = {
    "cost": _cost,
    "bench-routing": _bench_routing,
    "bench-blocks": _bench_blocks,
    "bench-report": _bench_report,
}
