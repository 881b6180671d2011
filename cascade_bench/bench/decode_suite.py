"""The ``bench-decode`` benchmark: what speeds up greedy decoding of a real model, beside its peers.

Every method decodes the same prompts (``data.prompt_suite``: documentation, code, prose, or a
user's file) greedily for ``new_tokens`` tokens, at each batch size (a batch is ``batch_size``
consecutive prompts of one set, left-padded; batch 1 runs every prompt alone):

- plain greedy, ours (``ours-greedy``: ``routing.generate`` at full depth over our own K/V cache)
  and Hugging Face's (``hf-greedy``); the faster of the two on a set is that set's **baseline**;
- ours, lossy: ``ours-lossy`` (the draft model's proposals kept, without the real model's agreement,
  where the draft's confidence is at least ``trust``; the real model still reads them, which fills
  its cache: the ``recompute`` K/V policy), with the continuation's NLL under the real model beside
  plain greedy's (``continuation_nll``);
- ours, lossless: ``ours-draft`` (a separate draft model, ``routing.draft_verify``),
  ``ours-lookup`` (prompt lookup), ``ours-lookup+draft`` (prompt lookup first, the draft where it
  finds nothing) and ``ours-self-spec`` (the real model's first ``early_exit_layer`` layers draft
  through its own head: ``routing.speculative`` on blocks); ``ours-self-spec-trained``, the same
  through a trained exit saved by ``train-exits`` (``--exits``);
- peers, each Hugging Face's own code path: ``hf-assisted`` (``assistant_model=`` our draft),
  ``hf-prompt-lookup`` (``prompt_lookup_num_tokens``) and ``hf-early-exit``
  (``assistant_early_exit`` at ``early_exit_layer``). Hugging Face runs these at batch 1 only; at
  larger batches their rows say so.

Timing: methods run back to back on each prompt (their order rotates from prompt to prompt), after
one untimed warm-up of every method; the prompt's own pass is excluded (decode time only).
``tokens_per_s`` of a set is its generated tokens over the summed decode seconds; ``speedup``
divides it by the baseline's; its interval is a BCa bootstrap (``scipy.stats.bootstrap`` through
``measure.intervals``) of the same ratio over calls resampled with replacement, the method's and the
baseline's seconds paired (2,000 resamples, fixed seed; none below 2 calls, as at batch 8 with 8
prompts per set). Per-token latency (p50, p95): each
generated token is charged its round's (or step's) time shared among the tokens it produced.

Speculative rows also give the measured terms of the standard prediction: ``acceptance`` (accepted
proposals over proposed, with its BCa interval over calls), and ``a``, the per-position acceptance
probability it estimates (accepted over accepted plus rounds with a rejection: a proposal after the
first rejected one is never judged, so accepted / proposed underestimates it), mean proposals per
round ``k``, the draft's cost per call ``c`` and the verification's cost per round ``v``, both as
fractions of one of our plain greedy steps at that batch; the **predicted** speedup is ``(1 -
a^(k+1)) / (1 - a)`` tokens per round (``(1 - a^k) / (1 - a)`` for self-speculation, whose round
yields at most its k drafts: ``choices.NO_BONUS_TOKEN``) over ``k c + v`` (draft calls per round as
measured), and **realisation** is the measured speedup over our plain greedy divided by the
predicted one (what the loop's own overheads cost).

``same_tokens``: the share of generated tokens equal to the same implementation's plain greedy at
the same batch size (ours against ``ours-greedy``, Hugging Face's against ``hf-greedy``).
FLOPs per decoded token are counted (``torch.utils.flop_counter``) at batch 1 on each set's first
prompt: (F(n) - F(1)) / (n - 1), F(n) being an untimed call generating n tokens, so the prompt's pass
cancels. The **physical floor**: a decode step must read every weight once, so it takes
at least the model's weight bytes over the memory bandwidth measured in this run; each row's time
per token is given as a multiple of that floor (at batch B a step yields B tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..data.prompt_suite import Prompt
from ..measure.intervals import IntervalSettings, ratio_interval
from ..measure.timing import synchronize
from .choices import BATCH_ONE_ONLY, METHODS, NEEDS_DRAFT, NEEDS_EXITS, NO_BONUS_TOKEN, PLAIN  # noqa: F401  (re-exported)
from .hf_generate import Call


@dataclass
class DecodeRow:
    """One method at one batch size on one prompt set (see the module docstring for each field)."""

    method: str
    batch_size: int
    prompt_set: str
    prompts: int
    tokens_per_s: float
    speedup: float
    speedup_interval: tuple
    baseline: str
    same_tokens: float
    latency_p50_ms: float
    latency_p95_ms: float
    acceptance: float = math.nan
    #: BCa 95% interval of ``acceptance`` over calls (accepted / proposed summed over resampled calls)
    acceptance_interval: tuple = (math.nan, math.nan)
    acceptance_per_position: float = math.nan
    proposals_per_round: float = math.nan
    tokens_per_round: float = math.nan
    draft_cost: float = math.nan
    verify_cost: float = math.nan
    draft_calls_per_round: float = math.nan
    predicted_speedup: float = math.nan
    realisation: float = math.nan
    flops_per_token: float = math.nan
    floor_multiple: float = math.nan
    continuation_nll: float = math.nan
    lossless: bool = True
    per_prompt_seconds: list = field(default_factory=list)


def left_padded(prompts: Sequence[Prompt], pad_id: int) -> tuple[Tensor, Tensor]:
    """(ids, attention mask) of ``prompts``, left-padded to the longest."""
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt.ids) :] = torch.tensor(prompt.ids)
        mask[i, width - len(prompt.ids) :] = 1
    return ids, mask


def memory_floor(model: torch.nn.Module, device) -> dict:
    """The physical floor of one decode step: the model's weight bytes (each storage once), the
    memory read bandwidth (best of 5 sums over a 256 MiB buffer) and float32 matmul throughput
    (best of 3 products of 1024 x 1024 matrices), measured now."""
    seen, weight_bytes = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            weight_bytes += tensor.untyped_storage().nbytes()
    buffer = torch.ones(64 * 1024 * 1024, dtype=torch.float32, device=device)
    best = math.inf
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        buffer.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    bandwidth = buffer.numel() * 4 / best
    a = torch.randn(1024, 1024, device=device)
    fastest = math.inf
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        a @ a
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
    del buffer
    return {
        "weight_bytes": weight_bytes,
        "bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": 2 * 1024**3 / fastest,
        "step_floor_s": weight_bytes / bandwidth,
    }


def bootstrap_interval(
    seconds: Sequence[float], baseline_seconds: Sequence[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """BCa 95% interval of the speedup (the baseline's summed seconds over the method's, on the same
    prompts) over calls resampled with replacement, the two sides paired (``measure.intervals``,
    ``scipy.stats.bootstrap``); (nan, nan) below 2 calls."""
    if len(seconds) < 2:
        return (math.nan, math.nan)
    low, high = ratio_interval(baseline_seconds, seconds, IntervalSettings(resamples, 0.95, seed))
    return (low, high)


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def predicted_speedup(
    acceptance: float, proposals: float, draft_cost: float, calls: float, verify_cost: float, bonus: bool = True
) -> float:
    """Tokens per round under i.i.d. acceptance, ``(1 - a^(k+1)) / (1 - a)`` (with ``bonus``: a
    round that accepts all k proposals also yields the verifier's next token) or ``(1 - a^k) /
    (1 - a)`` (without: at most k), over the round's cost in plain steps, ``calls * c + v``."""
    if not all(math.isfinite(x) for x in (acceptance, proposals, verify_cost)):
        return math.nan
    a, k = acceptance, proposals
    most = k + 1 if bonus else k
    tokens = most if a >= 1.0 else (1 - a**most) / (1 - a)
    cost = (calls * draft_cost if math.isfinite(draft_cost) else 0.0) + verify_cost
    return tokens / cost if cost > 0 else math.nan


def summarise(
    method: str,
    batch: int,
    prompt_set: str,
    calls: list[Call],
    baseline_name: str,
    baseline_calls: list[Call],
    plain_calls: list[Call],
    our_plain_calls: list[Call],
    floor: dict,
    flops_per_token: float,
) -> DecodeRow:
    """A row from the method's calls, its baseline's and its implementation's plain greedy calls
    (on the same batches: a method that ran on the first n batches is compared on those)."""
    count = len(calls)
    baseline_calls, plain_calls, our_plain_calls = (
        baseline_calls[:count],
        plain_calls[:count],
        our_plain_calls[:count],
    )
    tokens = sum(c.tokens.numel() for c in calls)
    seconds = sum(c.seconds for c in calls)
    rate = tokens / seconds
    base_rate = sum(c.tokens.numel() for c in baseline_calls) / sum(c.seconds for c in baseline_calls)
    same = sum(int((c.tokens == p.tokens).sum()) for c, p in zip(calls, plain_calls)) / tokens
    latencies = [s for c in calls for s in c.token_seconds]
    row = DecodeRow(
        method=method,
        batch_size=batch,
        prompt_set=prompt_set,
        prompts=sum(c.tokens.shape[0] for c in calls),
        tokens_per_s=rate,
        speedup=rate / base_rate,
        speedup_interval=bootstrap_interval([c.seconds for c in calls], [b.seconds for b in baseline_calls]),
        baseline=baseline_name,
        same_tokens=same,
        latency_p50_ms=1000 * _percentile(latencies, 0.5),
        latency_p95_ms=1000 * _percentile(latencies, 0.95),
        flops_per_token=flops_per_token,
        floor_multiple=(seconds / tokens) / (floor["step_floor_s"] / batch),
        per_prompt_seconds=[c.seconds for c in calls],
        lossless=method != "ours-lossy",
    )
    if all(c.nll is not None for c in calls):
        row.continuation_nll = float(sum(float(c.nll.double().sum()) for c in calls) / tokens)
    if calls[0].speculative:
        _add_speculative_terms(row, calls, our_plain_calls, rate)
    return row


def _add_speculative_terms(row: DecodeRow, calls: list[Call], our_plain_calls: list[Call], rate: float) -> None:
    """A speculative method's terms on ``row``: acceptance, tokens and draft calls per round, the draft
    and verify costs in plain steps of its own implementation, and the speedup they predict."""
    step = sum(c.seconds for c in our_plain_calls) / sum(c.tokens.shape[1] for c in our_plain_calls)
    rounds = sum(c.rounds for c in calls)
    loops = sum(c.loop_rounds for c in calls)
    proposed = sum(c.proposed for c in calls)
    accepted = sum(c.accepted for c in calls)
    judged = accepted + sum(c.rejections for c in calls)  # proposals the real model actually judged
    draft_calls = sum(c.draft_calls for c in calls)
    row.acceptance = accepted / proposed if proposed else math.nan
    if len(calls) >= 2 and proposed:
        per_call = ([c.accepted for c in calls], [c.proposed for c in calls])
        row.acceptance_interval = tuple(ratio_interval(*per_call, IntervalSettings(2000, 0.95, 0)))
    row.acceptance_per_position = accepted / judged if judged else math.nan
    row.proposals_per_round = proposed / rounds
    row.tokens_per_round = sum(c.emitted for c in calls) / rounds
    row.draft_calls_per_round = draft_calls / loops
    row.draft_cost = (sum(c.draft_seconds for c in calls) / draft_calls) / step if draft_calls else math.nan
    row.verify_cost = (sum(c.verify_seconds for c in calls) / loops) / step
    ours_rate = sum(c.tokens.numel() for c in our_plain_calls) / sum(c.seconds for c in our_plain_calls)
    with_prediction(row, rate / ours_rate)


def with_prediction(row: DecodeRow, over_our_greedy: float) -> DecodeRow:
    """Set the row's predicted speedup from its measured terms (a, k, c, calls, v; a proposal never
    judged counts as a = 0) and its realisation, ``over_our_greedy`` (its measured speedup over our
    plain greedy) divided by the prediction. Returns the row."""
    a = row.acceptance_per_position if math.isfinite(row.acceptance_per_position) else 0.0
    row.predicted_speedup = predicted_speedup(
        a,
        row.proposals_per_round,
        row.draft_cost,
        row.draft_calls_per_round,
        row.verify_cost,
        bonus=row.method not in NO_BONUS_TOKEN,
    )
    row.realisation = over_our_greedy / row.predicted_speedup
    return row


def timed_rotation(
    methods: dict[str, Callable[[Tensor, Tensor], Call]],
    batches: list[tuple[Tensor, Tensor]],
    progress: Optional[Callable[[str], None]] = None,
    caps: Optional[dict[str, int]] = None,
    start: int = 0,
) -> dict[str, list[Call]]:
    """Every method on every batch, back to back, the order rotating by one method per batch (from
    ``start``, so consecutive sets go on rotating); a method capped in ``caps`` runs on its first that
    many batches only."""
    names = list(methods)
    caps = caps or {}
    calls: dict[str, list[Call]] = {name: [] for name in names}
    for index, (ids, mask) in enumerate(batches):
        shift = (index + start) % len(names)
        for name in names[shift:] + names[:shift]:
            if index < caps.get(name, len(batches)):
                calls[name].append(methods[name](ids, mask))
        if progress is not None:
            progress(f"batch {index + 1}/{len(batches)} done")
    return calls


def greedy_agreement(draft, vocabulary: Optional[Tensor], batches, greedy_calls: Sequence[Call]) -> float:
    """Share of the real model's greedy tokens (``greedy_calls`` on ``batches``, one prompt each)
    that the draft's top-1 (over ``vocabulary`` when given) predicts, teacher-forced on the prompt
    and the greedy continuation."""
    same = total = 0
    with torch.inference_mode():
        for (ids, mask), call in zip(batches, greedy_calls):
            if ids.shape[0] != 1:
                raise ValueError("greedy_agreement reads batch-1 calls")
            joined = torch.cat([ids[mask.bool()][None], call.tokens.to(ids.device)], dim=1).to(draft.device)
            logits = draft.logits(draft(input_ids=joined).hidden)[0]
            if vocabulary is not None:
                vocabulary = vocabulary.to(logits.device)
                predicted = vocabulary[logits[:, vocabulary].argmax(-1)]
            else:
                predicted = logits.argmax(-1)
            start = joined.shape[1] - call.tokens.shape[1] - 1
            same += int((predicted[start:-1] == joined[0, start + 1 :]).sum())
            total += call.tokens.shape[1]
    return same / total if total else math.nan


def whole_suite_rows(rows: Sequence[DecodeRow], new_tokens: int) -> list[DecodeRow]:
    """Per batch size and method, one row over every prompt set together (``prompt_set="all"``): its
    summed seconds against the plain greedy method fastest over the whole suite, on the same calls
    (a capped method against the baseline's first calls of each set), with the bootstrap interval
    over all calls; same tokens weighted by tokens. Other columns stay per set."""
    out: list[DecodeRow] = []
    for batch in sorted({r.batch_size for r in rows}):
        of_batch = [r for r in rows if r.batch_size == batch and r.prompt_set != "all"]
        sets = sorted({r.prompt_set for r in of_batch})
        by = {(r.method, r.prompt_set): r for r in of_batch}
        plain = [m for m in PLAIN if all((m, s) in by for s in sets)]
        if not plain:
            continue
        baseline = min(plain, key=lambda m: sum(sum(by[(m, s)].per_prompt_seconds) for s in sets))
        for method in dict.fromkeys(r.method for r in of_batch):
            if not all((method, s) in by for s in sets):
                continue
            mine, theirs, same, tokens = [], [], 0.0, 0
            for s in sets:
                row = by[(method, s)]
                count = len(row.per_prompt_seconds)
                mine += row.per_prompt_seconds
                theirs += by[(baseline, s)].per_prompt_seconds[:count]
                called = count * batch * new_tokens
                same += row.same_tokens * called
                tokens += called
            out.append(
                DecodeRow(
                    method=method,
                    batch_size=batch,
                    prompt_set="all",
                    prompts=sum(by[(method, s)].prompts for s in sets),
                    tokens_per_s=tokens / sum(mine),
                    speedup=sum(theirs) / sum(mine),
                    speedup_interval=bootstrap_interval(mine, theirs),
                    baseline=baseline,
                    same_tokens=same / tokens,
                    latency_p50_ms=math.nan,
                    latency_p95_ms=math.nan,
                    lossless=by[(method, sets[0])].lossless,
                    per_prompt_seconds=mine,
                )
            )
    return out
