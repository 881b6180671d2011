"""The ``bench-decode`` job: load the real model (and its draft), cut the prompt suite, time every
method (``decode_suite``), and write one JSON file and one Markdown table per batch size."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..data.markdown import markdown_table
from ..data.prompt_suite import PROMPT_SETS, SUITE_VERSION, prompt_suite, read_prompts_file
from ..data.storage import write_json_atomic, write_text_atomic
from ..data.tokenization import check_tokenizer_folder
from ..measure.environment import environment_conditions
from ..measure.timing import PhaseClock
from ..routing.draft_verify import speculative_generate
from ..routing.generation import generate
from ..routing.speculative import self_speculative_generate
from ..stages.ensemble import Ensemble
from ..stages.llm import LLM
from .decode_suite import (
    BATCH_ONE_ONLY,
    METHODS,
    NEEDS_DRAFT,
    NEEDS_EXITS,
    PLAIN,
    DecodeRow,
    bootstrap_interval,
    greedy_agreement,
    left_padded,
    memory_floor,
    summarise,
    timed_rotation,
    whole_suite_rows,
    with_prediction,
)
from .decoding import early_exit_failure
from .hf_generate import Call, hf_generate_timed

#: Capped to --early-exit-prompts at batch 1 (slow).
EARLY_EXIT_METHODS = ("ours-self-spec", "ours-self-spec-trained", "hf-early-exit")
WARM_UP_TOKENS = 8  # an untimed warm-up call's new tokens: enough to allocate and pick every kernel


def _ours_greedy(target: LLM, new_tokens: int) -> Callable:
    ensemble = Ensemble([target])

    def call(ids, mask) -> Call:
        out = generate(ensemble, ids, mask, max_new_tokens=new_tokens, method="full")
        # the decode loop ran new_tokens - 1 steps (the first token came from the prompt's pass)
        seconds = out.seconds_per_token * out.tokens.numel() * new_tokens / max(new_tokens - 1, 1)
        step = seconds / new_tokens  # a row waits one step for each of its tokens
        return Call(seconds=seconds, tokens=out.tokens, token_seconds=[step] * out.tokens.numel(), nll=out.nll)

    return call


def _speculative(target: LLM, new_tokens: int, **options) -> Callable:
    def call(ids, mask) -> Call:
        out = speculative_generate(target, ids, mask, max_new_tokens=new_tokens, **options)
        return Call(
            seconds=out.seconds,
            tokens=out.tokens,
            token_seconds=out.token_seconds,
            proposed=out.proposed,
            accepted=out.accepted,
            rejections=out.rejections,
            rounds=out.rounds,
            loop_rounds=out.loop_rounds,
            emitted=out.emitted,
            draft_calls=out.draft_calls,
            draft_seconds=out.draft_seconds + out.lookup_seconds,
            verify_seconds=out.verify_seconds,
            speculative=True,
            nll=out.nll,
        )

    return call


def _self_speculative(blocks: Ensemble, new_tokens: int, draft_length: int) -> Callable:
    def call(ids, mask) -> Call:
        out = self_speculative_generate(blocks, ids, mask, max_new_tokens=new_tokens, draft_length=draft_length)
        # its loop made new_tokens - 1 tokens (the first came from the prompt's pass): scaled as ours-greedy
        seconds = out.seconds_per_token * out.tokens.numel() * new_tokens / max(new_tokens - 1, 1)
        return Call(
            seconds=seconds,
            tokens=out.tokens,
            token_seconds=[seconds / out.tokens.shape[1]] * out.tokens.numel(),  # its mean: a row waits elapsed / N
            proposed=out.drafted,
            accepted=out.accepted,
            rejections=out.rejections,
            rounds=out.rounds,
            loop_rounds=out.loop_rounds,
            emitted=out.emitted,
            draft_calls=out.loop_rounds * draft_length,
            draft_seconds=out.draft_seconds,
            verify_seconds=out.verify_seconds,
            speculative=True,
        )

    return call


def _trained_exit_blocks(model, layer: int, saved: dict, path: Path) -> tuple[Ensemble, str]:
    """The model cut before ``layer``, its first block exiting through the trained exit at ``layer``
    of the ``saved`` exits read from ``path`` (then the model's own final norm and lm_head); and the
    exit's recipe."""
    from ..stages.blocks import exit_through
    from ..training.saved_exits import exits_from_payload

    recipe, exits = exits_from_payload(saved, model, [layer], path)
    blocks = Ensemble.from_blocks(model, [layer])
    exit_through(blocks[0], exits[layer])
    return blocks, recipe


def _hf(model, new_tokens: int, pad_id: int, **options) -> Callable:
    return lambda ids, mask: hf_generate_timed(model, ids, mask, new_tokens, pad_id, **options)


def _calibrated_confidence(target: LLM, draft: LLM, vocabulary, tokenizer, new_tokens: int) -> tuple[float, dict]:
    """``--confidence auto``: the draft call's cost as a share of a plain step, timed on a validation
    text, then ``calibrate_confidence`` on 8 windows of 128 tokens of the embedded validation split."""
    from ..data.corpus import embedded_corpus
    from ..data.windows import encode_documents
    from ..routing.draft_verify import calibrate_confidence

    stream = encode_documents(tokenizer, embedded_corpus().documents("validation"))
    windows = stream[: 8 * 128].reshape(8, 128)
    ids, mask = windows[:1, :64], torch.ones(1, 64, dtype=torch.long)
    tokens = min(new_tokens, 16)
    plain = _ours_greedy(target, tokens)
    drafting = _speculative(target, tokens, draft=draft, draft_length=1, draft_vocabulary=vocabulary)
    plain(ids, mask), drafting(ids, mask)  # warm-up
    step = plain(ids, mask).seconds / tokens
    timed = drafting(ids, mask)
    cost = (timed.draft_seconds / max(timed.draft_calls, 1)) / step
    threshold, curve = calibrate_confidence(draft, target, windows, cost, vocabulary)
    return threshold, {
        "draft_call_cost": cost,
        "threshold": threshold if math.isfinite(threshold) else "inf (never draft)",
        "curve": [{"from_confidence": edge, "agreement": rate} for edge, rate in curve],
        "text": "embedded validation split, 8 windows of 128 tokens, teacher-forced",
    }


def _counted_flops(call: Callable, ids, mask) -> float:
    """Counted FLOPs of one untimed call (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..measure.flops import EXTRA_FLOP_FORMULAS

    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        call(ids, mask)
    return counter.get_total_flops()


@dataclass(frozen=True)
class DecodeOptions:
    """How the speculative methods draft: ``draft_length`` tokens of the draft model above
    ``confidence``, ``lookup`` tokens from the prompt (``hf_lookup`` for Hugging Face's), lossy
    acceptance at ``trust``, and the self-speculative draft length."""

    draft_length: int = 2
    confidence: float = 0.0
    lookup: int = 2
    hf_lookup: int = 10
    trust: float = 0.5
    self_spec_length: int = 4


@dataclass
class DecodeModels:
    """What the methods run on: the real model (as loaded and as an ``LLM``), its pad id, the layer the
    early-exit methods draft from, the draft model and its vocabulary, and the cut models of the
    self-speculative methods (untrained exit, trained exit and that exit's recipe)."""

    hf_model: object
    target: LLM
    pad_id: int
    layer: int
    draft: Optional[LLM] = None
    vocabulary: Optional[torch.Tensor] = None
    blocks: Optional[Ensemble] = None
    trained_blocks: Optional[Ensemble] = None
    exit_recipe: Optional[str] = None

    def builders(self, tokens: int, options: DecodeOptions) -> dict[str, Callable[[], Callable]]:
        """Per method, what builds its call for ``tokens`` new tokens."""
        target, hf_model, pad_id = self.target, self.hf_model, self.pad_id
        drafting = dict(
            draft=self.draft,
            draft_length=options.draft_length,
            confidence=options.confidence,
            draft_vocabulary=self.vocabulary,
        )
        return {
            "ours-greedy": lambda: _ours_greedy(target, tokens),
            "hf-greedy": lambda: _hf(hf_model, tokens, pad_id),
            "ours-draft": lambda: _speculative(target, tokens, **drafting),
            "ours-lookup": lambda: _speculative(target, tokens, lookup=options.lookup),
            "ours-lookup+draft": lambda: _speculative(target, tokens, **drafting, lookup=options.lookup),
            "ours-self-spec": lambda: _self_speculative(self.blocks, tokens, options.self_spec_length),
            "ours-self-spec-trained": lambda: _self_speculative(self.trained_blocks, tokens, options.self_spec_length),
            "ours-lossy": lambda: _speculative(target, tokens, **drafting, trust=options.trust),
            "hf-assisted": lambda: _hf(hf_model, tokens, pad_id, assistant_model=self.draft.model),
            "hf-prompt-lookup": lambda: _hf(hf_model, tokens, pad_id, prompt_lookup_num_tokens=options.hf_lookup),
            "hf-early-exit": lambda: _hf(hf_model, tokens, pad_id, assistant_early_exit=self.layer),
        }


def _checked_methods(methods, flop_tokens, new_tokens, batch_sizes, confidence) -> list[str]:
    """The methods asked for, the plain baselines first (they always run); ValueError naming a bad
    argument before anything loads."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {METHODS}")
    if isinstance(flop_tokens, bool) or not isinstance(flop_tokens, int) or flop_tokens < 2:
        raise ValueError(f"flop_tokens must be an int >= 2 (FLOPs per token difference two calls), got {flop_tokens!r}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an int >= 2, got {new_tokens!r}")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive ints, got {list(batch_sizes)}")
    if confidence != "auto" and (
        isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1
    ):
        raise ValueError(f"confidence must be 'auto' or a probability in [0, 1], got {confidence!r}")
    return list(PLAIN) + [m for m in methods if m not in PLAIN]


def _with_inputs(methods: list[str], draft_path, exits_path, notes: list[str]) -> tuple[list[str], Optional[dict]]:
    """The methods whose inputs were given (a draft folder, an exits file; the others skipped with a
    note) and the exits file read (a wrong one refused now, before any long work)."""
    needs_draft = set(NEEDS_DRAFT) & set(methods)
    if draft_path is not None and not Path(draft_path).is_dir():
        raise ValueError(f"--draft {draft_path} is not a folder; expected a draft saved by `cascade-bench train-draft`")
    if draft_path is None and needs_draft:
        notes.append(f"no --draft folder: {', '.join(sorted(needs_draft))} skipped")
        methods = [m for m in methods if m not in needs_draft]
    if exits_path is not None and not set(NEEDS_EXITS) & set(methods):
        notes.append(f"--exits {exits_path} not used: none of {', '.join(NEEDS_EXITS)} was asked for")
    if exits_path is None and set(NEEDS_EXITS) & set(methods):
        notes.append(f"no --exits file: {', '.join(NEEDS_EXITS)} skipped")
        methods = [m for m in methods if m not in NEEDS_EXITS]
    if exits_path is None:
        return methods, None
    from ..training.saved_exits import PER_TOKEN_RECIPES, read_exits_file

    saved_exits = read_exits_file(Path(exits_path))
    if saved_exits["recipe"] not in PER_TOKEN_RECIPES:
        raise ValueError(
            f"--exits {exits_path} holds {saved_exits['recipe']!r} exits; self-speculative decoding takes exits "
            f"that read one position at a time ({', '.join(PER_TOKEN_RECIPES)}): the attention adapter reads "
            "earlier positions and would need a K/V cache of its own while decoding, which it does not keep"
        )
    return methods, saved_exits


def _read_suite(tokenizer, prompts_file, per_set, corpus, sets, batch_sizes, notes: list[str]) -> dict:
    """The prompt sets (from ``prompts_file``, or cut from the corpus); a set with fewer prompts than
    a batch size is refused."""
    if prompts_file is not None:
        suite = read_prompts_file(Path(prompts_file), tokenizer)
    else:
        suite, suite_notes = prompt_suite(tokenizer, per_set, corpus, sets)
        notes.extend(suite_notes)
    for name, prompts in suite.items():
        too_few = [b for b in batch_sizes if len(prompts) < b]
        if too_few:
            raise ValueError(f"prompt set {name!r} has {len(prompts)} prompts, fewer than batch sizes {too_few}")
    return suite


def _draft_layer(target: LLM, early_exit_layer: Optional[int], saved_exits: Optional[dict], exits_path) -> int:
    """The layer the early-exit methods draft from: ``early_exit_layer``, or 80% of the depth kept
    inside the model (a 2-layer model drafts with its first layer); one the exits file holds."""
    if early_exit_layer is not None and not 1 <= early_exit_layer < target.num_layers:
        raise ValueError(f"--early-exit-layer must be in [1, {target.num_layers - 1}], got {early_exit_layer}")
    layer = early_exit_layer or min(max(1, round(0.8 * target.num_layers)), target.num_layers - 1)
    if saved_exits is not None:
        from ..training.saved_exits import saved_layers

        held = saved_layers(saved_exits)
        if layer not in held:
            raise ValueError(
                f"--exits {exits_path} has exits at layers {held}, not at the draft layer {layer}: "
                f"pass --early-exit-layer one of {held}"
            )
    return layer


def _runnable(methods: list[str], target: LLM, hf_model, notes: list[str]) -> list[str]:
    """The methods this model can run (a 1-layer model has no earlier layer; Hugging Face's early exit
    refuses some families), the others noted."""
    skipped = {}
    if target.num_layers < 2:
        skipped = dict.fromkeys(EARLY_EXIT_METHODS, "a 1-layer model has no earlier layer to draft from")
    elif early_exit_failure(hf_model):
        skipped = {"hf-early-exit": early_exit_failure(hf_model)}
    for method, reason in skipped.items():
        if method in methods:
            notes.append(f"{method} not run: {reason}")
    return [m for m in methods if m not in skipped]


def _cut_models(models: DecodeModels, methods: list[str], saved_exits, exits_path) -> None:
    """The model cut at the draft layer for the self-speculative methods that run: drafting through
    its own head (``ours-self-spec``) or through the trained exit (``ours-self-spec-trained``)."""
    if "ours-self-spec" in methods:
        models.blocks = Ensemble.from_blocks(models.hf_model, [models.layer])
    if "ours-self-spec-trained" in methods:
        models.trained_blocks, models.exit_recipe = _trained_exit_blocks(
            models.hf_model, models.layer, saved_exits, Path(exits_path)
        )


def _load_draft(models: DecodeModels, draft_path: Path, device: str) -> None:
    """The draft model and its vocabulary on ``models``; refused unless it shares the real model's ids."""
    from transformers import AutoModelForCausalLM

    from ..training.draft_job import read_draft_vocabulary

    models.draft = LLM(AutoModelForCausalLM.from_pretrained(draft_path).to(device).eval())
    models.vocabulary = read_draft_vocabulary(Path(draft_path))
    if models.draft.vocab_size != models.target.vocab_size:
        raise ValueError(
            f"the draft {draft_path} has {models.draft.vocab_size} ids, the real model {models.target.vocab_size}: "
            "a draft must share the real model's tokenizer"
        )


@dataclass(frozen=True)
class SuiteMeasure:
    """How the suite is measured: new tokens per timed call, FLOPs counted over ``flop_span`` tokens
    (at batch 1, when ``count_flops``), the untimed warm-up's tokens, and how many prompts per set the
    slow early-exit methods run at batch 1."""

    new_tokens: int
    flop_span: int
    warm_span: int
    count_flops: bool
    early_exit_prompts: int


def _measure_suite(
    models: DecodeModels,
    options: DecodeOptions,
    methods: list[str],
    suite: dict,
    batch_sizes: Sequence[int],
    measure: SuiteMeasure,
    floor,
    phases: PhaseClock,
    notes: list[str],
    say: Callable,
) -> tuple[list[DecodeRow], dict[str, float]]:
    """Every method on every prompt set at every batch size: the rows (each against the fastest plain
    baseline of its set) and the draft's greedy agreement per set."""
    timed, counting = models.builders(measure.new_tokens, options), models.builders(measure.flop_span, options)
    one_token, warming = models.builders(1, options), models.builders(measure.warm_span, options)
    rows: list[DecodeRow] = []
    agreement: dict[str, float] = {}  # the draft's top-1 against the real model's greedy tokens, per set
    rotation = 0  # the methods' order keeps rotating from one set to the next
    for batch in batch_sizes:
        active = [m for m in methods if batch == 1 or m not in BATCH_ONE_ONLY]
        for method in methods:
            if method not in active:
                notes.append(f"{method} at batch {batch}: not run (Hugging Face supports it at batch 1 only)")
        counted = measure.count_flops and batch == 1
        calls_of = {m: timed[m]() for m in active}
        counters = {m: (counting[m](), one_token[m]()) for m in active} if counted else {}
        warmed = False
        for name, prompts in suite.items():
            batches = [
                left_padded(prompts[i : i + batch], models.pad_id) for i in range(0, len(prompts) - batch + 1, batch)
            ]
            say(f"batch {batch}, {name}: {len(batches)} calls of each of {len(active)} methods")
            if not warmed:  # untimed, once per batch size: first calls allocate and pick kernels
                with phases("warm_up"):
                    for method in active:
                        warming[method]()(*batches[0])
                warmed = True
            flops = _decoded_flops(counters, batches[0], measure.flop_span, phases) if counted else {}
            caps = dict.fromkeys(EARLY_EXIT_METHODS, measure.early_exit_prompts) if batch == 1 else {}
            with phases("timed"):
                calls = timed_rotation(calls_of, batches, caps=caps, start=rotation)
            rotation += len(batches)
            if batch == 1 and models.draft is not None and "ours-greedy" in calls:
                with phases("draft_agreement"):
                    agreement[name] = greedy_agreement(models.draft, models.vocabulary, batches, calls["ours-greedy"])
            rows += _set_rows(calls, active, batch, name, floor, flops)
    return rows, agreement


def _decoded_flops(counters: dict, batch: tuple, flop_span: int, phases: PhaseClock) -> dict[str, float]:
    """Per method, counted FLOPs per decoded token on ``batch``: (F(span) - F(1)) / (span - 1), so the
    prompt's pass cancels."""
    with phases("flop_counting"):
        return {
            method: (_counted_flops(long_call, *batch) - _counted_flops(short_call, *batch)) / (flop_span - 1)
            for method, (long_call, short_call) in counters.items()
        }


def _set_rows(calls: dict, active: list[str], batch: int, name: str, floor, flops: dict) -> list[DecodeRow]:
    """One set's rows at one batch size: each method against the fastest plain baseline measured in the
    same rotation, its tokens checked against its own family's greedy tokens."""
    plain = {m: calls[m] for m in PLAIN if m in calls}
    baseline = min(plain, key=lambda m: sum(c.seconds for c in plain[m]) / sum(c.tokens.numel() for c in plain[m]))
    return [
        summarise(
            method,
            batch,
            name,
            calls[method],
            baseline,
            calls[baseline],
            calls["hf-greedy" if method.startswith("hf-") else "ours-greedy"],
            calls["ours-greedy"],
            floor,
            flops.get(method, math.nan),
        )
        for method in active
    ]


# Over 60 lines for its signature: one keyword per ``bench-decode`` flag, so a call reads like the
# command; the body is one step per line, each step a function of its own.
def run_decode_bench(
    target_path: str,
    origin: str,
    *,
    draft_path: Optional[Path] = None,
    exits_path: Optional[Path] = None,
    corpus: Optional[Path] = None,
    prompts_file: Optional[Path] = None,
    per_set: int = 8,
    sets: Sequence[str] = PROMPT_SETS,
    batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 96,
    draft_length: int = 2,
    confidence: "float | str" = "auto",
    lookup: int = 2,
    hf_lookup: int = 10,
    trust: float = 0.5,
    early_exit_layer: Optional[int] = None,
    self_spec_length: int = 4,
    early_exit_prompts: int = 2,
    flop_tokens: int = 16,
    methods: Sequence[str] = METHODS,
    count_flops: bool = True,
    device: str = "cpu",
    json_path: Optional[Path] = None,
    markdown_path: Optional[Path] = None,
    progress: bool = True,
) -> tuple[list[DecodeRow], dict]:
    """Every method on every prompt set at every batch size (module docstrings); returns the rows
    and the run's conditions, written to ``json_path`` and ``markdown_path`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..stages.families import register_own_families

    register_own_families()  # a saved model of our own families loads like any other
    notes: list[str] = []
    methods = _checked_methods(methods, flop_tokens, new_tokens, batch_sizes, confidence)
    methods, saved_exits = _with_inputs(methods, draft_path, exits_path, notes)
    phases = PhaseClock()
    check_tokenizer_folder(target_path, "the real model's folder")
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    with phases("prompt_suite"):
        suite = _read_suite(tokenizer, prompts_file, per_set, corpus, sets, batch_sizes, notes)
    with phases("loading"):
        hf_model = AutoModelForCausalLM.from_pretrained(target_path).to(device).eval()
    target = LLM(hf_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    models = DecodeModels(hf_model, target, pad_id, _draft_layer(target, early_exit_layer, saved_exits, exits_path))
    methods = _runnable(methods, target, hf_model, notes)
    if draft_path is not None and set(NEEDS_DRAFT) & set(methods):
        with phases("loading"):
            _load_draft(models, draft_path, device)
    with phases("floor"):
        floor = memory_floor(hf_model, device)
    calibration = None
    if confidence == "auto":
        confidence, calibration = 0.0, {"note": "no draft: nothing to calibrate"}
        if models.draft is not None:
            with phases("calibration"):
                confidence, calibration = _calibrated_confidence(
                    target, models.draft, models.vocabulary, tokenizer, new_tokens
                )
    options = DecodeOptions(draft_length, confidence, lookup, hf_lookup, trust, self_spec_length)
    with phases("loading"):
        _cut_models(models, methods, saved_exits, exits_path)
    measure = SuiteMeasure(
        new_tokens, min(flop_tokens, new_tokens), min(WARM_UP_TOKENS, new_tokens), count_flops, early_exit_prompts
    )
    say = print if progress else (lambda *_: None)
    rows, agreement = _measure_suite(models, options, methods, suite, batch_sizes, measure, floor, phases, notes, say)
    rows += whole_suite_rows(rows, new_tokens)
    run = dict(
        device=device, draft_path=draft_path, exits_path=exits_path, saved_exits=saved_exits, calibration=calibration
    )
    conditions = _conditions(models, options, measure, methods, suite, floor, agreement, phases, notes, origin, run)
    say("seconds per phase: " + ", ".join(f"{phase} {seconds:.0f}" for phase, seconds in phases.seconds.items()))
    if json_path is not None:
        write_json_atomic(json_path, {"rows": [asdict(r) for r in rows], "conditions": conditions})
    if markdown_path is not None:
        write_text_atomic(markdown_path, format_decode_tables(rows, conditions))
    return rows, conditions


def _conditions(
    models: DecodeModels,
    options: DecodeOptions,
    measure: SuiteMeasure,
    methods: list[str],
    suite: dict,
    floor,
    agreement: dict,
    phases: PhaseClock,
    notes: list[str],
    origin: str,
    run: dict,
) -> dict:
    """What the run measured and how: the machine, the models, the prompt sets, every option, the
    FLOP counting, the memory floor, the seconds per phase and the notes (``run``: the draft folder,
    the device asked for, the exits file and what was read from it, the confidence calibration)."""
    capped = " and ".join(m for m in EARLY_EXIT_METHODS if m in methods) or "none of " + ", ".join(EARLY_EXIT_METHODS)
    span, draft, vocabulary, confidence = measure.flop_span, models.draft, models.vocabulary, options.confidence
    return {
        **environment_conditions(torch.device(run["device"]), models.hf_model.dtype),
        "model": origin,
        "draft": str(run["draft_path"]) if draft is not None else None,
        "draft_vocabulary": int(vocabulary.numel()) if vocabulary is not None else None,
        "suite_version": SUITE_VERSION,
        "prompt_sets": {name: [p.source for p in prompts] for name, prompts in suite.items()},
        "prompt_tokens": {name: [len(p.ids) for p in prompts] for name, prompts in suite.items()},
        "new_tokens": measure.new_tokens,
        "decoding": "greedy",
        "draft_length": options.draft_length,
        "confidence": confidence if math.isfinite(confidence) else "inf (never draft)",
        "confidence_calibration": run["calibration"],
        "draft_greedy_agreement": agreement,
        "lookup": options.lookup,
        "trust": options.trust,
        "hf_prompt_lookup_num_tokens": options.hf_lookup,
        "early_exit_layer": models.layer,
        "exits": {
            "file": str(run["exits_path"]),
            "recipe": models.exit_recipe,
            "trained_on": run["saved_exits"]["model"],
        }
        if models.trained_blocks is not None
        else None,
        "self_spec_draft_length": options.self_spec_length,
        "early_exit_prompts": f"at batch 1, {capped} ran on each set's first {measure.early_exit_prompts} prompts",
        "flops": f"per decoded token, counted at batch 1 on each set's first prompt: (F({span}) - F(1)) / "
        f"{span - 1}, F(n) the FLOPs of a call generating n tokens"
        if measure.count_flops
        else "not counted",
        "floor": floor,
        "warm_up": f"untimed, once per batch size: every method generating {measure.warm_span} tokens for the first "
        "set's first batch",
        "phase_seconds": phases.seconds,
        "notes": notes,
    }


def _level(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _cell(value: float, digits: int = 2) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


#: The decode table's columns, and which of them are right-aligned (the numbers).
DECODE_COLUMNS = (
    "method, set, tokens/s, speedup (95% CI), baseline, same tokens, NLL, p50 / p95 ms, acceptance (95% CI), "
    "tokens / round, c, v, predicted, realisation, GFLOP / token, realised / FLOP-predicted, x floor"
).split(", ")
_RIGHT = [False, False, True, False, False, True, True, False] + [True] * 9


def _with_interval(value: float, interval: tuple, digits: int = 2) -> str:
    low, high = interval
    text = _cell(value, digits)
    return f"{text} ({low:.{digits}f}-{high:.{digits}f})" if text and math.isfinite(low) else text


def flop_realisation(row: DecodeRow, flops: dict) -> float:
    """The row's measured speedup over the one its FLOPs per token predict against its baseline's
    (``flops``: (method, set) -> FLOPs per token, counted at batch 1); NaN where either is not counted."""
    mine, theirs = (
        flops.get((row.method, row.prompt_set), math.nan),
        flops.get((row.baseline, row.prompt_set), math.nan),
    )
    if not (math.isfinite(mine) and math.isfinite(theirs)) or mine <= 0:
        return math.nan
    return row.speedup / (theirs / mine)


def _decode_cells(r: DecodeRow, flops: dict) -> list[str]:
    low, high = r.speedup_interval
    interval = f" ({low:.2f}-{high:.2f})" if math.isfinite(low) else ""
    latency = f"{r.latency_p50_ms:.1f} / {r.latency_p95_ms:.1f}" if math.isfinite(r.latency_p50_ms) else ""
    return [
        r.method,
        r.prompt_set,
        f"{r.tokens_per_s:.1f}",
        f"{r.speedup:.2f}x{interval}",
        r.baseline,
        f"{r.same_tokens:.3f}",
        _cell(r.continuation_nll, 3),
        latency,
        _with_interval(r.acceptance, getattr(r, "acceptance_interval", (math.nan, math.nan))),
        _cell(r.tokens_per_round),
        _cell(r.draft_cost, 3),
        _cell(r.verify_cost),
        _cell(r.predicted_speedup),
        _cell(r.realisation),
        _cell(r.flops_per_token / 1e9, 3),
        _cell(flop_realisation(r, flops)),
        _cell(r.floor_multiple, 1),
    ]


def format_decode_tables(rows: Sequence[DecodeRow], conditions: dict) -> str:
    """One Markdown table per batch size (rows: method x prompt set)."""
    parts = []
    for batch in sorted({r.batch_size for r in rows}):
        flops = {(r.method, r.prompt_set): r.flops_per_token for r in rows if r.batch_size == 1}
        cells = (_decode_cells(r, flops) for r in rows if r.batch_size == batch)
        table = markdown_table(DECODE_COLUMNS, cells, _RIGHT)
        parts += [f"### Batch {batch}\n\n{table}", ""]
    floor = conditions["floor"]
    parts.append(
        f"Floor: {floor['weight_bytes'] / 1e6:.0f} MB of weights over {floor['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s "
        f"= {floor['step_floor_s'] * 1000:.1f} ms per step; float32 matmul {floor['matmul_flops_per_s'] / 1e9:.0f} "
        "GFLOP/s."
    )
    calibration = conditions.get("confidence_calibration") or {}
    if "threshold" in calibration:
        parts.append(
            f"Draft confidence level (calibrated): {_level(calibration['threshold'])}; a draft call cost "
            f"{calibration['draft_call_cost']:.3f} of a plain step."
        )
    agreement = conditions.get("draft_greedy_agreement") or {}
    if agreement:
        shown = ", ".join(f"{name} {value:.3f}" for name, value in agreement.items())
        parts.append(f"Draft's top-1 agreement with the real model's greedy tokens (batch 1, teacher-forced): {shown}.")
    exits = conditions.get("exits")
    if exits:
        parts.append(
            f"ours-self-spec-trained drafts from layer {conditions['early_exit_layer']} through the trained "
            f"{exits['recipe']} exit in {exits['file']}."
        )
    parts.extend(f"Note: {note}" for note in conditions["notes"])
    return "\n".join(parts) + "\n"


def rewrite_tables(json_path: Path, markdown_path: Optional[Path] = None) -> list[DecodeRow]:
    """Re-read a ``bench-decode`` JSON file, recompute each row's prediction from its measured terms
    and the whole-suite rows from the per-set rows, and write the JSON and Markdown again
    (atomically); nothing is re-measured."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise ValueError(f"--tables-from {json_path} is not a file; expected a bench-decode JSON")
    payload = json.loads(json_path.read_text())
    if not isinstance(payload, dict) or "rows" not in payload or "conditions" not in payload:
        raise ValueError(f"{json_path} is not a bench-decode JSON (no 'rows' and 'conditions')")
    rows = [
        DecodeRow(
            **{
                **row,
                "speedup_interval": tuple(row["speedup_interval"]),
                "acceptance_interval": tuple(row.get("acceptance_interval", (math.nan, math.nan))),
            }
        )
        for row in payload["rows"]
        if row["prompt_set"] != "all"
    ]
    for row in rows:  # the prediction again from the measured terms (its formula may have been corrected)
        stored = (row.predicted_speedup, row.realisation)
        if math.isfinite(stored[0]):
            with_prediction(row, stored[1] * stored[0])
            if row.predicted_speedup == stored[0]:
                row.realisation = stored[1]  # the same prediction: the stored figure, not a rounded recomputation
    by = {(r.method, r.prompt_set, r.batch_size): r for r in rows}
    for row in rows:  # the speedup's interval again from the stored per-call seconds (its method may have changed)
        base = by.get((row.baseline, row.prompt_set, row.batch_size))
        if base is not None and row.per_prompt_seconds:
            count = len(row.per_prompt_seconds)
            row.speedup_interval = bootstrap_interval(row.per_prompt_seconds, base.per_prompt_seconds[:count])
    rows += whole_suite_rows(rows, payload["conditions"]["new_tokens"])
    write_json_atomic(json_path, {"rows": [asdict(r) for r in rows], "conditions": payload["conditions"]})
    if markdown_path is not None:
        write_text_atomic(markdown_path, format_decode_tables(rows, payload["conditions"]))
    return rows
