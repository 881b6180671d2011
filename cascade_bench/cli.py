"""The ``cascade-bench`` command line: the parser, declared by the command modules
(``commands.*.add_commands``), and ``main``, which dispatches to their ``HANDLERS`` and turns a
ValueError into one line."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Optional, Sequence

# Only torch-free modules at the top: the parser (and ``--help``) needs names, not models.
from .commands import (
    decoding_commands,
    experiment_commands,
    harness_commands,
    memory_commands,
    routing_commands,
    training_commands,
)
from .commands.harness_commands import lm_eval_command
from .measure.allocator import retain_freed_memory

#: The command modules, in the order ``--help`` lists their commands.
COMMAND_MODULES = (
    experiment_commands,
    routing_commands,
    decoding_commands,
    training_commands,
    memory_commands,
    harness_commands,
)
#: One handler per command; ``main`` dispatches through this table.
HANDLERS = {name: handler for module in COMMAND_MODULES for name, handler in module.HANDLERS.items()}


def build_parser() -> argparse.ArgumentParser:
    """The ``cascade-bench`` parser: one sub-parser per command, declared by its command module. Each
    sub-parser is its command's ``command_parser`` default, so a run config can set its defaults."""
    parser = argparse.ArgumentParser(
        prog="cascade-bench",
        description="Measure what early exit really buys for causal language models. `cascade-bench COMMAND "
        "--help` for a command's flags; the README and docs/ for the guides.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(commands)
    for command in commands.choices.values():
        command.set_defaults(command_parser=command)
    return parser


def _with_run_config(parser: argparse.ArgumentParser, argv: list, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` parsed again with the run config's settings as the command's defaults (flags given
    explicitly still win)."""
    from .experiment.config import bench_settings

    args.command_parser.set_defaults(**{k: v for k, v in bench_settings(args.config).items() if hasattr(args, k)})
    return parser.parse_args(argv)


def _error(error: ValueError) -> int:
    print(f"cascade-bench: error: {error}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        retain_freed_memory()  # before anything is timed (measure.allocator)
        if argv[:1] == ["lm-eval"]:  # every later argument is lm_eval's own, options included
            return lm_eval_command(argv[1:])
    except ValueError as error:
        return _error(error)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None) is not None:
            args = _with_run_config(parser, argv, args)
        with warnings.catch_warnings():  # a warning reads as one line of the command's output
            warnings.showwarning = _one_line
            return HANDLERS[args.command](args)
    except ValueError as error:
        return _error(error)


def _one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as the command line shows it: its category and message, not a source excerpt."""
    print(f"{category.__name__}: {message}", file=sys.stderr if file is None else file)


if __name__ == "__main__":
    sys.exit(main())
