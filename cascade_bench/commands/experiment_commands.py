"""``run``, ``report``, ``plot`` (one experiment: train, sweep, tables, plots) and ``compare`` (runs side by side)."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path


def _add_experiment_command(commands) -> None:
    from ..experiment.config import add_config_arguments

    for name, text in (
        (
            "run",
            "train (or load) the cascade and its baselines, sweep thresholds, measure, "
            "write results, tables, plots and <name>.report.md",
        ),
        ("report", "write the tables and <name>.report.md from stored results"),
        ("plot", "draw the figures from stored results"),
    ):
        command = commands.add_parser(
            name, help=text, description=text + ". Every config key is a flag; a TOML file gives the rest."
        )
        command.add_argument(
            "config_file",
            nargs="?",
            default=None,
            metavar="CONFIG",
            help="TOML config file: each key as the flag below spelled with underscores (--seq-len: seq_len), at the "
            "top level or under its table ([data], [stages], [training], [sweep], [exits], [risk_control], "
            "[measurement], [runtime]; configs/default.toml writes every key under its table)",
        )
        command.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "report":
            command.add_argument(
                "--pages",
                type=Path,
                default=None,
                metavar="DIR",
                help="also write the tables the documentation pages include (quality, wall, checks, rules, "
                "risk, kv) as DIR/<block>.md",
            )
        add_config_arguments(command)


def _add_compare_command(commands) -> None:
    compare = commands.add_parser(
        "compare",
        help="several runs (e.g. one per protocol) at matched FLOPs, from their stored records",
        description="Compare runs of `cascade-bench run` on the same data (e.g. --protocol ashem, cascade, deep): "
        "stage 0 alone, full depth, routed early exit near hard ratio 0.5, and the PPL of each routed "
        "curve at fixed fractions of the dense model's FLOPs per token.",
    )
    compare.add_argument("names", nargs="+", metavar="NAME", help="run names (results/NAME.jsonl under --out)")
    compare.add_argument("--out", type=Path, default=Path("."), help="the runs' output folder (default .)")
    compare.add_argument(
        "--to",
        type=Path,
        default=Path("results/comparison"),
        metavar="STEM",
        help="write STEM.md, STEM.tex and STEM.csv (default %(default)s)",
    )
    compare.add_argument(
        "--exit-rule",
        default=None,
        metavar="RULE",
        help="protocols layout: every run's sweep under this exit rule (default: each run's own "
        "rule, named in the table)",
    )
    compare.add_argument(
        "--layout",
        choices=["protocols", "seed"],
        default="protocols",
        help="protocols: PPL at matched FLOPs; seed: the ASHEM report's quantities, the seed's "
        "published figures beside each run",
    )


def _experiment(args: argparse.Namespace) -> int:
    from ..experiment.checks import format_checks, run_checks
    from ..experiment.config import config_from_args
    from ..experiment.pipeline import experiment_paths, run_experiment
    from ..experiment.results_store import ResultsStore

    config = config_from_args(args, args.config_file)
    paths = experiment_paths(config)
    if args.command == "run":
        from ..measure.distributed import join_launch, leave_launch

        start = time.perf_counter()
        with _transformers_bars(shown=not args.quiet):
            written = run_experiment(config, progress=not args.quiet)
        ranks = join_launch(config.device)
        leave_launch()
        if not ranks.is_main:  # under torchrun, rank 0 reports
            return 0
        records = list(ResultsStore(paths["results"]))
        print(f"\nchecks ({config.name}):\n" + format_checks(run_checks(records, config.plausible_ppl)))
        print(
            f"{config.name}: done in {time.perf_counter() - start:.0f} s; report {paths['report']}, "
            f"records {paths['results']}, plots in {paths['plots']}"
        )
        print(_time_split(written["run"]))
        print(_next_steps(config, written["models"] / "cascade"))
        return 0
    records = list(ResultsStore(paths["results"]))
    if not records:
        raise ValueError(f"no results in {paths['results']}; run `cascade-bench run` first")
    if args.command == "report":
        from ..experiment.reports import write_report

        print(f"wrote {write_report(records, config, paths)}")
        if args.pages is not None:
            from ..experiment.published import write_published

            for path in write_published(records, args.pages):
                print(f"wrote {path}")
    else:
        from ..experiment.plots import make_plots

        for path in make_plots(records, paths["confidence"], paths["plots"], config.name):
            print(f"wrote {path}")
    return 0


def _time_split(path) -> str:
    """One line: where the run's time went (``results/<name>.run.json``)."""
    import json

    run = json.loads(Path(path).read_text())
    parts = ", ".join(f"{name} {seconds:.0f} s ({run['shares'][name]:.0%})" for name, seconds in run["seconds"].items())
    return f"time: {parts} ({path})"


def _next_steps(config, cascade: Path) -> str:
    """Where the run saved its cascade, and ready-to-paste commands that decode it on the run's own text
    and evaluate it on the harness's offline tasks."""
    if not (cascade / "cascade.json").is_file():
        return "no cascade saved by this run"
    corpus = "" if config.corpus == "embedded" else f" --corpus {config.corpus}"
    if config.corpus_config:
        corpus += f" --corpus-config {config.corpus_config}"
    return (
        f"saved cascade: {cascade}\n"
        f"decode with it:   cascade-bench bench-generate --cascade {cascade}{corpus} --batch-sizes 1 8 "
        "--new-tokens 33 --repeats 3\n"
        f"evaluate it on the harness's offline tasks: cascade-bench lm-eval --model cascade_bench --model_args "
        f"cascade={cascade} --tasks cascade_embedded_rolling --include_path lm_eval_tasks   (after "
        "`pip install -e .[eval]` and `cascade-bench lm-eval-tasks --out lm_eval_tasks`)"
    )


def _compare(args: argparse.Namespace) -> int:
    from ..experiment.comparison import comparison_table, seed_comparison_table
    from ..experiment.reports import to_markdown, write_table
    from ..experiment.results_store import ResultsStore

    runs = {}
    for name in args.names:
        path = args.out / "results" / f"{name}.jsonl"
        if not path.is_file():
            raise ValueError(
                f"no results for run {name!r}: missing {path} (run `cascade-bench run --name {name}` first)"
            )
        runs[name] = list(ResultsStore(path))
    if args.layout == "seed":
        table = seed_comparison_table(runs)
        caption = "The ASHEM report's quantities: the seed's published figures and these runs"
    else:
        table = comparison_table(runs, rule=args.exit_rule)
        rule = args.exit_rule or "each run's own"
        caption = f"Protocols at matched FLOPs (FLOPs ratios relative to the dense model of the same depth; exit rule: {rule})"  # noqa: E501
    paths = write_table(table, args.to, caption)
    print(to_markdown(table))
    for path in paths:
        print(f"wrote {path}")
    return 0


def add_commands(commands) -> None:
    """Declare this module's commands on the ``cascade-bench`` sub-parsers."""
    _add_experiment_command(commands)
    _add_compare_command(commands)


#: The handler of each command declared here.
HANDLERS = {
    "run": _experiment,
    "report": _experiment,
    "plot": _experiment,
    "compare": _compare,
}


@contextlib.contextmanager
def _transformers_bars(shown: bool):
    """transformers' own progress bars (writing a checkpoint's shards) off inside, unless ``shown``."""
    from transformers.utils import logging as transformers_logging

    was = transformers_logging.is_progress_bar_enabled()
    if not shown:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not shown:
            transformers_logging.enable_progress_bar()
