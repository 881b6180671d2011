"""Decoding policies side by side: cost and quality of every way to decode one cascade.

For each batch size, on the same prompts: full depth (``method="full"``), per-token early exit
under each K/V policy, the ``batch`` exit policy, a SkipDecode-style ``schedule``, lossless
self-speculative decoding, stage 0 alone (the draft/exit step cost), and Hugging Face's
``generate`` (the unsplit model when the cascade is blocks of one model, with and without its
``assistant_early_exit`` self-speculation; stage 0 alone otherwise).

The exit share after stage 0 is forced (``generation.ForcedExitRate``, at the cost of the named
rule): per token for ``per_token`` (rows decide independently) and once per step for ``batch``
(every row gets the step's decision, which is what a quorum produces; the rule still runs on
every row), at the named rule's cost and at ``cos_sim``'s (no head for continuing rows). The schedule exits the
first half of the decode steps at full depth and the rest
after stage 0 (no rule at all). Each variant is timed back to back with full depth, the order
alternating within pairs; speedup is the median over pairs of full-depth time over its time
(on a shared machine one run of the same call varies by 30% or more, so the default takes 15
pairs).

Quality columns against full-depth greedy: ``same_tokens`` (fraction of generated positions
equal), ``common_prefix`` (mean length of the prefix equal to it, as a fraction), and
``continuation_nll``: the mean NLL of the produced tokens under the full cascade, teacher-forced.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..data.markdown import markdown_table
from ..data.storage import write_json_atomic
from ..routing.generation import generate
from ..routing.passes import forward_cascade
from ..routing.speculative import self_speculative_generate
from ..stages.ensemble import Ensemble
from ..stages.exits import resolve_exit_rule
from .forced_exits import ForcedExitRate
from .hf_generate import hf_generate_timed


@dataclass(frozen=True)
class DecodingRow:
    """One batch size and decoding variant (times: seconds per generated token, all rows together)."""

    batch_size: int
    variant: str
    exit_policy: str
    kv_policy: str
    decode_exit_ratio: float
    layer_cost: float
    stage1_rows_per_step: float
    seconds_per_token: float
    seconds_per_token_full: float
    speedup: float
    same_tokens: float
    common_prefix: float
    continuation_nll: float
    acceptance_rate: float = math.nan
    mean_accepted_length: float = math.nan
    verify_share: float = math.nan
    tokens_per_loop_round: float = math.nan


@dataclass(frozen=True)
class TeacherForcedRow:
    """One K/V policy, teacher-forced over the evaluation windows at the calibrated thresholds."""

    kv_policy: str
    ppl: float
    exit_ratio_stage0: float
    layer_cost: float
    flops: int
    flop_ratio: float
    recomputed_tokens: int
    propagated_tokens: int


class ForcedStepExit(ForcedExitRate):
    """``ForcedExitRate`` deciding once per call: every row of a decode step gets the same decision
    (exactly ``rate`` of every 8 steps exit), while ``rule`` still runs on every row."""

    def __call__(self, h_in: Optional[Tensor], h_out: Tensor, logits: Optional[Tensor]) -> Tensor:
        one = super().__call__(
            h_in[:1] if h_in is not None else None, h_out[:1], logits[:1] if logits is not None else None
        )
        if h_out.shape[0] > 1:
            self.rule(h_in[1:] if h_in is not None else None, h_out[1:], logits[1:] if logits is not None else None)
        return one.expand(h_out.shape[0])


def _quality(ensemble: Ensemble, prompts: Tensor, tokens: Tensor, reference: Tensor) -> tuple[float, float, float]:
    same = float((tokens == reference).float().mean())
    equal_prefix = (tokens == reference).long().cumprod(dim=1).sum(dim=1).float() / tokens.shape[1]
    joined = torch.cat([prompts, tokens], dim=1)
    with torch.inference_mode():
        out = forward_cascade(ensemble, joined, method="full")
    start = prompts.shape[1] - 1
    nll = out.nll[:, start : start + tokens.shape[1]].double().mean()
    return same, float(equal_prefix.mean()), float(nll)


def _paired(
    variant: Callable[[], object],
    full: Callable[[], object],
    repeats: int,
    warmup: int,
    seconds: Callable[[object], float],
) -> tuple[object, float, float, float]:
    for _ in range(warmup):
        variant(), full()
    mine, theirs, out = [], [], None
    for i in range(repeats):  # the order alternates within pairs: neither side always runs second
        if i % 2:
            theirs.append(full().seconds_per_token)
        out = variant()
        mine.append(seconds(out))
        if not i % 2:
            theirs.append(full().seconds_per_token)
    return (
        out,
        statistics.median(mine),
        statistics.median(theirs),
        statistics.median(b / a for a, b in zip(mine, theirs)),
    )


def _hf_model(ensemble: Ensemble):
    """The unsplit Hugging Face model when the cascade is blocks of one model, else None."""
    first = ensemble[0]
    source = getattr(first, "source", None)
    if source is None or any(getattr(stage, "source", None) is not source for stage in ensemble):
        return None
    return source


def _hf_seconds_per_token(model, ids: Tensor, new_tokens: int, **options) -> tuple[float, Tensor]:
    """HF ``generate``, greedy: decode seconds per token (all rows together; the prompt's pass is
    excluded) and its tokens, in our ``generate``'s convention: the decode loop's time (new_tokens - 1
    steps, the first token comes from the prompt's pass) over every generated token."""
    call = hf_generate_timed(model, ids, torch.ones_like(ids), new_tokens, 0, **options)
    loop_share = (new_tokens - 1) / new_tokens  # call.seconds is scaled to all new_tokens steps
    return call.seconds * loop_share / call.tokens.numel(), call.tokens


@dataclass(frozen=True)
class DecodingSettings:
    """What ``bench_decoding`` times: ``new_tokens`` per call, ``rate`` of decode tokens (or steps)
    forced to exit after stage 0 under ``rule``'s cost, the batch policy's ``quorum``, the
    self-speculative ``draft_length``, and ``repeats`` pairs (after ``warmup``) per variant."""

    new_tokens: int = 65
    rate: float = 0.5
    rule: str = "max_prob"
    quorum: float = 1.0
    draft_length: int = 4
    repeats: int = 15
    warmup: int = 1
    seed: int = 0


def bench_decoding(
    ensemble: Ensemble,
    prompts: dict[int, Tensor],
    settings: DecodingSettings = DecodingSettings(),
    hf_peer: bool = True,
) -> list[DecodingRow]:
    """Every decoding variant at every batch size (see the module docstring), as ``settings`` say.
    ``prompts`` maps a batch size to its (B, P) prompt ids. Stage 0's exit rule is restored afterwards."""
    if len(ensemble) < 2:
        raise ValueError(f"the decoding benchmark needs at least 2 stages, got {len(ensemble)}")
    new_tokens = settings.new_tokens
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 3:
        raise ValueError(f"new_tokens must be an int >= 3, got {new_tokens!r}")
    hf_model = _hf_model(ensemble) if hf_peer else None
    saved = ensemble[0].exit_rule
    rows: list[DecodingRow] = []
    try:
        for batch, ids in prompts.items():
            rows += _batch_rows(ensemble, ids, batch, settings, hf_model, saved)
    finally:
        ensemble[0].exit_rule = saved
    return rows


def _batch_rows(ensemble: Ensemble, ids: Tensor, batch: int, s: DecodingSettings, hf_model, saved) -> list[DecodingRow]:
    """Every variant on one batch of prompts, each paired with the full-depth decode of the same batch
    (stage 0's rule set per variant; ``saved``, the ensemble's own, where none is forced)."""

    def full():
        return generate(ensemble, ids, max_new_tokens=s.new_tokens, method="full")

    reference = full().tokens
    full()  # a second untimed pass: the first variant's pairs must not pay for warming up
    rows: list[DecodingRow] = []

    def record(variant: str, timed_out: tuple, exit_policy: str = "per_token", kv_policy: str = "absent", **extra):
        rows.append(_decoding_row(ensemble, ids, reference, batch, variant, timed_out, exit_policy, kv_policy, extra))

    def timed(make):
        return _paired(make, full, s.repeats, s.warmup, lambda o: o.seconds_per_token)

    for variant, rule, make, fields in _forced_variants(ensemble, ids, s, full):
        ensemble[0].exit_rule = rule if rule is not None else saved
        record(variant, timed(make), **fields)
    ensemble[0].exit_rule = saved
    spec = timed(
        lambda: self_speculative_generate(ensemble, ids, max_new_tokens=s.new_tokens, draft_length=s.draft_length)
    )
    out = spec[0]
    record(
        f"self-speculative, draft {s.draft_length}",
        spec,
        exit_policy="speculative",
        acceptance_rate=out.acceptance_rate,
        mean_accepted_length=out.mean_accepted_length,
        verify_share=out.verify_seconds / (out.seconds_per_token * out.tokens.numel()),
        tokens_per_loop_round=(out.tokens.shape[1] - 1) / out.loop_rounds,
    )
    if hf_model is not None:
        for name, result in _hf_peer_results(ensemble, hf_model, ids, batch, s, full):
            record(name, result, exit_policy="hf")
    return rows


def _forced_variants(ensemble: Ensemble, ids: Tensor, s: DecodingSettings, full: Callable) -> list[tuple]:
    """(variant, stage 0's rule for it or None for the ensemble's own, the call, the row's policy
    fields) of every variant the forced rules make: full depth, stage 0 alone, the per-token policy
    under each K/V policy, the batch policy under the named rule's cost and the cheapest rule's, and
    the schedule. Each forced rule is a fresh instance (they keep a running count)."""
    n, exit_at_0 = s.new_tokens, [0.5] + [math.inf] * (len(ensemble) - 2)
    steps = n - 1
    schedule = [len(ensemble) - 1] * (steps // 2) + [0]
    variants: list[tuple] = [
        ("full depth", None, full, {"exit_policy": "-"}),
        (
            "stage 0 only (exit/draft step)",
            resolve_exit_rule(ForcedExitRate(0.0, s.rule)),
            lambda: generate(ensemble, ids, max_new_tokens=n, thresholds=[-math.inf] + exit_at_0[1:]),
            {},
        ),
    ]
    for kv in ("absent", "propagate", "recompute"):
        variants.append(
            (
                f"per_token, {s.rate:.0%} forced to exit",
                resolve_exit_rule(ForcedExitRate(s.rate, s.rule, seed=s.seed)),
                lambda kv=kv: generate(ensemble, ids, max_new_tokens=n, thresholds=exit_at_0, kv_policy=kv),
                {"kv_policy": kv},
            )
        )
    for cost in dict.fromkeys((s.rule, "cos_sim")):  # the named rule's cost, and the cheapest rule's
        variants.append(
            (
                f"batch (quorum {s.quorum:g}), {s.rate:.0%} of steps forced to exit, {cost} cost",
                resolve_exit_rule(ForcedStepExit(s.rate, cost, seed=s.seed)),
                lambda: generate(
                    ensemble, ids, max_new_tokens=n, thresholds=exit_at_0, exit_policy="batch", quorum=s.quorum
                ),
                {"exit_policy": "batch"},
            )
        )
    variants.append(
        (
            f"schedule: {steps // 2} steps full, then stage 0",
            None,
            lambda: generate(ensemble, ids, max_new_tokens=n, exit_policy="schedule", exit_schedule=schedule),
            {"exit_policy": "schedule"},
        )
    )
    return variants


def _hf_peer_results(ensemble: Ensemble, hf_model, ids: Tensor, batch: int, s: DecodingSettings, full: Callable):
    """(name, timed result) of Hugging Face's ``generate`` on the unsplit model and, at batch 1 where
    it runs, its ``assistant_early_exit`` at stage 0's depth."""
    depth = ensemble[0].num_layers
    peers = [("HF generate (unsplit model)", {})]
    known_failure = peers_not_run(ensemble).get("HF assistant_early_exit")
    if batch == 1 and known_failure:
        print(f"HF assistant_early_exit={depth} not run: {known_failure}")
    elif batch == 1:  # HF's assisted generation takes batch 1 only
        peers.append((f"HF assistant_early_exit={depth}", {"assistant_early_exit": depth}))
    for name, options in peers:
        result = _hf_result(hf_model, ids, s.new_tokens, options, full, s.repeats, s.warmup)
        if result is not None:
            yield name, result


def _decoding_row(
    ensemble: Ensemble,
    ids: Tensor,
    reference: Tensor,
    batch: int,
    variant: str,
    timed_out: tuple,
    exit_policy: str,
    kv_policy: str,
    extra: dict,
) -> DecodingRow:
    """One variant's row: its timed pair (output, its seconds per token, full depth's, the speedup),
    its decode exit share and stage-1 rows per step, and its tokens against full depth's."""
    out, mine, theirs, speedup = timed_out
    same, prefix, nll = _quality(ensemble, ids, out.tokens, reference)
    stage_rows = getattr(out, "stage_rows", None)
    decode = getattr(out, "decode_tokens", 0)
    return DecodingRow(
        batch_size=batch,
        variant=variant,
        exit_policy=exit_policy,
        kv_policy=kv_policy,
        decode_exit_ratio=out.exit_counts[0] / decode if decode else math.nan,
        layer_cost=getattr(out, "layer_cost", math.nan),
        stage1_rows_per_step=(
            float(stage_rows[:, 1].float().mean()) if stage_rows is not None and stage_rows.numel() else math.nan
        ),
        seconds_per_token=mine,
        seconds_per_token_full=theirs,
        speedup=speedup,
        same_tokens=same,
        common_prefix=prefix,
        continuation_nll=nll,
        **extra,
    )


#: Model families on which transformers' ``assistant_early_exit`` is known to fail, and why: the
#: bench says so instead of calling it.
HF_EARLY_EXIT_FAILS = {
    "gpt2": "transformers' assistant_early_exit fails on GPT-2 models (an IndexError in its cache update); "
    "it runs on Llama-style models",
}


def early_exit_failure(model) -> Optional[str]:
    """Why transformers' ``assistant_early_exit`` is not called on ``model`` (None when it may be)."""
    return HF_EARLY_EXIT_FAILS.get(getattr(getattr(model, "config", None), "model_type", ""))


def peers_not_run(ensemble: Ensemble) -> dict[str, str]:
    """The Hugging Face peers the bench does not call on this cascade's model, and why."""
    reason = early_exit_failure(_hf_model(ensemble))
    return {"HF assistant_early_exit": reason} if reason else {}


@dataclass
class _HFOutput:
    tokens: Tensor
    seconds_per_token: float
    exit_counts: tuple = (0,)
    decode_tokens: int = 0


def _hf_result(model, ids, new_tokens, options, full, repeats, warmup):
    """HF generate timed against our full depth, or None when this transformers version refuses the
    options (``hf_generate`` restores the model's layer count after every call)."""

    def run():
        seconds, tokens = _hf_seconds_per_token(model, ids, new_tokens, **options)
        return _HFOutput(tokens=tokens, seconds_per_token=seconds)

    try:
        run()
    except Exception as error:  # a peer that this transformers version cannot run is reported, not fatal
        print(
            f"HF generate with {options} on batch {ids.shape[0]} not measured: this transformers version could not "
            f"run it on this model ({type(error).__name__}: {error}); the other rows are unaffected"
        )
        return None
    return _paired(run, full, repeats, warmup, lambda o: o.seconds_per_token)


def teacher_forced_policies(ensemble: Ensemble, windows: Sequence[Tensor]) -> list[TeacherForcedRow]:
    """PPL, exit ratio, layer cost and counted FLOPs of routed teacher forcing under each K/V policy
    at the ensemble's thresholds, against the full cascade's counted FLOPs."""
    from ..cost.measurement import measure_cost

    def measure(method: str, **kwargs):
        return measure_cost(ensemble, windows, method, warmup=0, repeats=1, fvcore=False, spans=False, **kwargs)

    full = measure("full")
    rows = []
    for kv in ("absent", "propagate", "recompute"):
        record = measure("routed", kv_policy=kv)
        q = record.quality
        rows.append(
            TeacherForcedRow(
                kv_policy=kv,
                ppl=q.ppl,
                exit_ratio_stage0=q.exit_ratios[0],
                layer_cost=q.layer_cost,
                flops=record.flops,
                flop_ratio=record.flops / full.flops,
                recomputed_tokens=sum(q.tokens_computed) - sum(q.tokens_entered),
                propagated_tokens=sum(q.tokens_propagated),
            )
        )
    return rows


def predicted_speculative_speedup(
    row: DecodingRow, stage0_row: DecodingRow, draft_length: int, slowest_row: bool = False
) -> float:
    """Speedup over full depth that the acceptance and the measured step costs predict. In units of
    one full-depth step (each from its own back-to-back pairs): a round costs ``draft_length`` draft
    steps (1 / stage 0's speedup each) plus the verification it measured, for the round's tokens:
    the mean accepted length, or with ``slowest_row`` the tokens per row per round of the batch's
    loop, which runs until its slowest row is done (the same at batch 1)."""
    tokens_per_round = row.tokens_per_loop_round if slowest_row else row.mean_accepted_length
    verify_per_round = row.verify_share * tokens_per_round / row.speedup
    return tokens_per_round / (draft_length / stage0_row.speedup + verify_per_round)


def decoding_checks(rows: Sequence[DecodingRow], draft_length: int, rate: float = 0.5) -> list[tuple[str, bool]]:
    """The issue's three bars, each from this run's own rows."""
    checks = []
    by = {(r.batch_size, r.variant, r.kv_policy): r for r in rows}
    for r in rows:
        if r.batch_size == 8 and r.exit_policy == "batch":
            checks.append(
                (
                    f"batch 8, batch policy ({r.variant.rsplit(', ', 1)[-1]}), {rate:.0%} of steps exit after "
                    f"stage 0: {r.speedup:.3f}x full depth >= 1.15",
                    r.speedup >= 1.15,
                )
            )
        if r.batch_size == 1 and r.exit_policy == "per_token" and r.kv_policy == "absent" and "forced" in r.variant:
            stage0 = by[(1, "stage 0 only (exit/draft step)", "absent")]
            # In units of a full-depth step: an exiting step costs 1 / stage 0's speedup, a continuing one 1.
            ideal = 1.0 / (rate / stage0.speedup + (1 - rate))
            share = r.speedup / ideal
            checks.append(
                (
                    f"batch 1, per_token, {rate:.0%} exit: {r.speedup:.3f}x vs ideal {ideal:.3f}x from the "
                    f"measured steps (stage 0 + head = {1 / stage0.speedup:.3f} of a full step) = {share:.3f} "
                    f">= 0.9",
                    share >= 0.9,
                )
            )
        if r.exit_policy == "speculative":
            stage0 = by[(r.batch_size, "stage 0 only (exit/draft step)", "absent")]
            predicted = predicted_speculative_speedup(r, stage0, draft_length)
            checks.append(
                (
                    f"batch {r.batch_size}, self-speculative (acceptance {r.acceptance_rate:.1%}, "
                    f"{r.mean_accepted_length:.2f} tokens/round): {r.speedup:.3f}x vs predicted "
                    f"{predicted:.3f}x = {r.speedup / predicted:.3f} >= 0.9",
                    r.speedup / predicted >= 0.9,
                )
            )
            if r.batch_size > 1:  # a batch waits for its slowest row: the same bar on the loop's own rounds
                waiting = predicted_speculative_speedup(r, stage0, draft_length, slowest_row=True)
                checks.append(
                    (
                        f"batch {r.batch_size}, self-speculative with the loop's rounds (slowest row: "
                        f"{r.tokens_per_loop_round:.2f} tokens per row per round): {r.speedup:.3f}x vs "
                        f"predicted {waiting:.3f}x = {r.speedup / waiting:.3f} >= 0.9",
                        r.speedup / waiting >= 0.9,
                    )
                )
    return checks


#: What the table's two speed columns mean (printed under it): they differ by how the medians are taken.
SPEEDUP_CAPTION = (
    "speedup vs full: the median over back-to-back pairs of (full depth's time / the variant's time), each "
    "pair timed together; full / this: the full-depth calls' median time over the variant's median time, "
    "the basis of ms/token. They differ where the machine's speed drifted between pairs; the paired median "
    "is the steadier one."
)


def _shown(value, spec: str) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def format_decoding_table(rows: Sequence[DecodingRow]) -> str:
    header = (
        "batch, variant, K/V, exit after stage 0, layer cost, stage-1 rows/step, ms/token, tokens/s, speedup vs "
        "full, full / this, same tokens, common prefix, continuation NLL, acceptance"
    ).split(", ")
    cells = (
        [
            r.batch_size,
            r.variant,
            r.kv_policy if r.exit_policy == "per_token" else "-",
            _shown(r.decode_exit_ratio, ".1%"),
            _shown(r.layer_cost, ".3f"),
            _shown(r.stage1_rows_per_step, ".2f"),
            f"{r.seconds_per_token * 1e3:.3f}",
            f"{1 / r.seconds_per_token:,.0f}",
            f"{r.speedup:.3f}",
            f"{r.seconds_per_token_full / r.seconds_per_token:.3f}",
            f"{r.same_tokens:.3f}",
            f"{r.common_prefix:.3f}",
            f"{r.continuation_nll:.3f}",
            _shown(r.acceptance_rate, ".1%"),
        ]
        for r in rows
    )
    return markdown_table(header, cells)


def format_teacher_forced_table(rows: Sequence[TeacherForcedRow]) -> str:
    header = (
        "K/V policy, PPL, exit at stage 0, layer cost, counted FLOP ratio, recomputed tokens, "
        "propagated K/V (token x stage)"
    ).split(", ")
    cells = (
        [
            r.kv_policy,
            f"{r.ppl:.3f}",
            f"{r.exit_ratio_stage0:.3f}",
            f"{r.layer_cost:.3f}",
            f"{r.flop_ratio:.3f}",
            f"{r.recomputed_tokens:,}",
            f"{r.propagated_tokens:,}",
        ]
        for r in rows
    )
    return markdown_table(header, cells)


def write_decoding_bench(rows, teacher_forced, checks, conditions: dict, path: "Path | str") -> None:
    write_json_atomic(
        Path(path),
        {
            "conditions": conditions,
            "checks": [{"check": text, "met": met} for text, met in checks],
            "rows": [asdict(r) for r in rows],
            "teacher_forced": [asdict(r) for r in teacher_forced],
        },
    )
