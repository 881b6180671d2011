"""``train-draft`` and ``train-exits``: a draft model distilled from a real one, and exits taught to one."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import (
    add_model_args,
    positive_int,
    real_model,
)


def _add_train_draft_command(commands) -> None:
    from ..training.draft_config import DraftConfig

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
    add_model_args(draft)
    draft.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="the draft's folder (replaced)")
    draft.add_argument(
        "--layers", type=positive_int, default=defaults.layers, help="the real model's first layers copied"
    )
    draft.add_argument(
        "--top-k", type=positive_int, default=defaults.top_k, help="teacher logits kept per token; default %(default)s"
    )
    draft.add_argument(
        "--teacher-tokens", type=positive_int, default=defaults.teacher_tokens, help="default %(default)s"
    )
    draft.add_argument(
        "--validation-tokens",
        type=positive_int,
        default=defaults.validation_tokens,
        help="held-out tokens early stopping reads (default %(default)s)",
    )
    draft.add_argument(
        "--window", type=positive_int, default=defaults.window, help="tokens per training window (default %(default)s)"
    )
    draft.add_argument(
        "--batch-size", type=positive_int, default=defaults.batch_size, help="windows per step (default %(default)s)"
    )
    draft.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default %(default)s)")
    draft.add_argument(
        "--steps-per-check",
        type=positive_int,
        default=defaults.steps_per_check,
        help="training steps between held-out checks (default %(default)s)",
    )
    draft.add_argument(
        "--patience",
        type=positive_int,
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
    from ..training.exit_recipe_specs import EXIT_RECIPES, RECIPE_HELP, RecipeBudget

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
        "--layers", nargs="+", type=positive_int, default=None, help="candidate exit layers (default: exit_layers)"
    )
    exits.add_argument(
        "--window", type=positive_int, default=defaults.window, help="tokens per training window (default %(default)s)"
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


def _train_draft(args: argparse.Namespace) -> int:
    from ..training.distillation import DraftConfig
    from ..training.draft_job import train_draft

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
    folder, name = real_model(args)
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
    from ..experiment.config import config_from_args
    from ..experiment.exit_recipe_study import run_exit_recipes
    from ..training.exit_recipe_specs import RecipeBudget

    if args.tables_from is not None:
        from ..experiment.exit_recipe_study import rewrite_recipe_outputs

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


def add_commands(commands) -> None:
    """Declare this module's commands on the ``cascade-bench`` sub-parsers."""
    _add_train_draft_command(commands)
    _add_train_exits_command(commands)


#: The handler of each command declared here.
HANDLERS = {
    "train-draft": _train_draft,
    "train-exits": _train_exits,
}
