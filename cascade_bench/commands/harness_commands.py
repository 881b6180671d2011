"""``lm-eval``, ``lm-eval-tasks`` (the evaluation harness) and ``check-lock`` (is this install the locked one?)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def _add_lm_eval_tasks_command(commands) -> None:
    tasks = commands.add_parser(
        "lm-eval-tasks",
        help="write offline lm-evaluation-harness tasks over data that ships with Python",
        description="Write JSONL data and task YAMLs for lm-evaluation-harness: the embedded corpus's test split "
        "(loglikelihood_rolling), HTML entities as multiple choice (loglikelihood) and as generation "
        "(generate_until). Use the folder as --include_path.",
    )
    tasks.add_argument("--out", type=Path, default=Path("lm_eval_tasks"), help="folder (default %(default)s)")


def _add_lm_eval_command(commands) -> None:
    harness = commands.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-evaluation-harness with the cascade_bench model registered (needs the [eval] extra)",
        description="Runs lm_eval's own command line with the model 'cascade_bench' registered; every argument "
        "goes to lm_eval. Afterwards prints the cascade's cost columns (exit ratios, layer cost, "
        "FLOPs, FLOP ratio to full depth).",
    )
    harness.add_argument(
        "harness_args", nargs=argparse.REMAINDER, help="lm_eval's own arguments, passed through unchanged"
    )


def _add_check_lock_command(commands) -> None:
    lock = commands.add_parser(
        "check-lock",
        help="is this install the locked one? (exit 1 naming every package that differs)",
        description="Compare every installed distribution with the lock file's pins (markers evaluated for this "
        "interpreter; local build labels such as +cpu ignored). Exit 0 when the install is the "
        "locked one, 1 with one line per difference otherwise.",
    )
    lock.add_argument(
        "lock_file",
        nargs="?",
        type=Path,
        default=None,
        metavar="LOCK",
        help="lock file (default: requirements.lock of this clone)",
    )


def _check_lock(lock_file: Optional[Path]) -> int:
    from ..measure.lockfile import LOCK_NAME, installed_versions, lock_mismatches, read_lock, repository_lock

    lock_file = lock_file or repository_lock()
    if lock_file is None or not lock_file.is_file():
        raise ValueError(f"no lock file {lock_file or LOCK_NAME!s}: pass the path of requirements.lock")
    problems = lock_mismatches(read_lock(lock_file.read_text()), installed_versions())
    for line in problems:
        print(line)
    print(
        f"{lock_file}: "
        + (
            "the install matches the lock"
            if not problems
            else f"{len(problems)} installed package(s) differ from the lock"
        )
    )
    return 1 if problems else 0


def lm_eval_command(harness_args: Sequence[str]) -> int:
    import json
    import tempfile

    try:
        from lm_eval.__main__ import cli_evaluate

        from ..harness import lm_eval_model  # noqa: F401  (registers the model)
    except ImportError as error:
        raise ValueError(
            f"lm-evaluation-harness is not installed ({error}); pip install 'cascade-bench[eval]'"
        ) from None
    argv = list(harness_args)
    costs = None
    if "--model_args" in argv and "cost_json=" not in argv[argv.index("--model_args") + 1]:
        costs = Path(tempfile.mkdtemp(prefix="cascade-bench-")) / "costs.json"
        argv[argv.index("--model_args") + 1] += f",cost_json={costs}"
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    if costs is not None and costs.is_file():
        summary = json.loads(costs.read_text())
        print("\ncascade_bench costs over the scored tokens:")
        for key in (
            "scored_tokens",
            "exit_ratios",
            "layer_cost",
            "flops_counted",
            "flops_full_depth",
            "flop_ratio_to_full_depth",
            "generated_tokens",
            "generation_exit_ratios",
            "thresholds",
        ):
            print(f"  {key}: {summary.get(key)}")
    return 0


def _lm_eval_tasks(args: argparse.Namespace) -> int:
    from ..harness.tasks import write_local_tasks

    for path in write_local_tasks(args.out):
        print(f"wrote {path}")
    return 0


def add_commands(commands) -> None:
    """Declare this module's commands on the ``cascade-bench`` sub-parsers."""
    _add_lm_eval_tasks_command(commands)
    _add_lm_eval_command(commands)
    _add_check_lock_command(commands)


#: The handler of each command declared here.
HANDLERS = {
    "lm-eval": lambda args: lm_eval_command(args.harness_args),
    "lm-eval-tasks": _lm_eval_tasks,
    "check-lock": lambda args: _check_lock(args.lock_file),
}
