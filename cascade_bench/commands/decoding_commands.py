"""``bench-generate`` and ``bench-decode``: decoding benches, ours beside the Hugging Face peers."""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import (
    BUILTIN_RULE_CHOICES,
    add_cascade_args,
    add_json_arg,
    add_model_args,
    add_timing_args,
    build_cascade,
    confidence,
    fraction,
    positive_int,
    print_checks,
    prompt_corpus,
    prompt_tokenizer,
    real_model,
    run_header,
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
    add_cascade_args(decode)
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
        type=positive_int,
        nargs="+",
        default=[1, 8, 32],
        help="rows decoded together, one table block each (default %(default)s)",
    )
    decode.add_argument(
        "--hard-ratio",
        type=fraction,
        default=0.5,
        help="forced share of decode tokens (per_token) or steps (batch) that continue past stage 0 "
        "(the rest exit after it)",
    )
    decode.add_argument(
        "--cost-of",
        dest="rule",
        choices=BUILTIN_RULE_CHOICES,
        default="max_prob",
        help="the exit rule whose cost the forced exits pay",
    )
    decode.add_argument("--quorum", type=fraction, default=1.0, help="the batch policy's quorum")
    decode.add_argument("--draft-length", type=positive_int, default=4, help="self-speculative draft tokens per round")
    decode.add_argument(
        "--prompt-len", type=positive_int, default=64, help="prompt tokens per row (default %(default)s)"
    )
    decode.add_argument(
        "--new-tokens",
        type=positive_int,
        default=65,
        help="tokens generated per row (default %(default)s: 64 decode steps)",
    )
    add_timing_args(decode, warmup=1, repeats=15)
    add_json_arg(decode, "results/bench-generate.json", "rows, checks and conditions")


def _add_bench_decode_command(commands) -> None:
    from ..bench.choices import METHODS
    from ..data.prompt_suite import PROMPT_SETS

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
    add_model_args(decode)
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
    decode.add_argument("--per-set", type=positive_int, default=8, help="prompts per set; default %(default)s")
    decode.add_argument(
        "--sets", nargs="+", choices=PROMPT_SETS, default=list(PROMPT_SETS), help="prompt sets (prose needs --corpus)"
    )
    decode.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 8], help="default %(default)s")
    decode.add_argument("--new-tokens", type=positive_int, default=96, help="default %(default)s")
    decode.add_argument(
        "--draft-length", type=positive_int, default=2, help="most draft-model tokens per round; default %(default)s"
    )
    decode.add_argument(
        "--confidence",
        type=confidence,
        default="auto",
        help="a row stops drafting below this draft confidence; 'auto' (default) calibrates it so that a "
        "drafted token is accepted at least as often as its draft call costs (share of a plain step)",
    )
    decode.add_argument(
        "--lookup", type=int, default=2, help="most prompt-lookup tokens per round (ours); default %(default)s"
    )
    decode.add_argument(
        "--trust",
        type=fraction,
        default=0.5,
        help="ours-lossy keeps draft tokens at least this confident; default %(default)s",
    )
    decode.add_argument(
        "--hf-lookup", type=positive_int, default=10, help="HF prompt_lookup_num_tokens; default %(default)s"
    )
    decode.add_argument(
        "--early-exit-layer", type=positive_int, default=None, help="self-speculation's draft depth (default 80%%)"
    )
    decode.add_argument(
        "--self-spec-length",
        type=positive_int,
        default=4,
        help="most tokens the self-speculation methods (ours-self-spec, ours-self-spec-trained) draft per round; "
        "default %(default)s",
    )
    decode.add_argument(
        "--early-exit-prompts",
        type=positive_int,
        default=2,
        help="at batch 1 the early-exit self-speculation methods (ours-self-spec, ours-self-spec-trained, "
        "hf-early-exit) run on each set's first N prompts only (on a frozen trunk they run far below plain "
        "greedy); default %(default)s",
    )
    decode.add_argument(
        "--flop-tokens",
        type=positive_int,
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
    add_json_arg(decode, "results/bench-decode.json", "the rows and conditions")
    decode.add_argument(
        "--markdown",
        type=Path,
        default=Path("results/bench-decode.md"),
        help="where the tables go (default %(default)s)",
    )
    decode.add_argument("--quiet", action="store_true", help="no progress lines")


def _bench_generate(args: argparse.Namespace) -> int:
    from ..bench.decoding import SPEEDUP_CAPTION, format_decoding_table, format_teacher_forced_table
    from ..bench.decoding_run import run_decoding_bench

    corpus, corpus_config = prompt_corpus(args)
    ensemble, origin = build_cascade(args)
    tokenizer = prompt_tokenizer(args)
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
        hard_ratio=args.hard_ratio,
        rule=args.rule,
        quorum=args.quorum,
        draft_length=args.draft_length,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
        json_path=args.json,
    )
    shape = (f"prompts {args.prompt_len} tokens", f"{args.new_tokens} new tokens")
    print(run_header(origin, conditions, shape, (f"median of {args.repeats}; {conditions['data']}",)))
    print(format_decoding_table(rows))
    print("\n" + SPEEDUP_CAPTION)
    print("\nTeacher-forced, per K/V policy (" + conditions["teacher_forced"] + "):\n")
    print(format_teacher_forced_table(teacher_forced))
    print()
    print_checks(checks)
    return 0


def _bench_decode(args: argparse.Namespace) -> int:
    from ..bench.decode_run import format_decode_tables, rewrite_tables, run_decode_bench

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
    from ..bench.decode_suite import METHODS, NEEDS_DRAFT, NEEDS_EXITS

    asked = [m for m in args.methods if m in NEEDS_DRAFT]
    if args.draft is None and asked and list(args.methods) != list(METHODS):
        raise ValueError(f"--methods {' '.join(asked)} need a draft model: give --draft FOLDER (from `train-draft`)")
    asked = [m for m in args.methods if m in NEEDS_EXITS]
    if args.exits is None and asked and list(args.methods) != list(METHODS):
        raise ValueError(f"--methods {' '.join(asked)}: needs trained exits: give --exits FILE (from `train-exits`)")
    folder, name = real_model(args)
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
    print(run_header(name, conditions, (f"{args.new_tokens} new tokens", "greedy")))
    print(format_decode_tables(rows, conditions))
    print(f"wrote {args.json} and {args.markdown}")
    return 0


def add_commands(commands) -> None:
    """Declare this module's commands on the ``cascade-bench`` sub-parsers."""
    _add_bench_generate_command(commands)
    _add_bench_decode_command(commands)


#: The handler of each command declared here.
HANDLERS = {
    "bench-generate": _bench_generate,
    "bench-decode": _bench_decode,
}
