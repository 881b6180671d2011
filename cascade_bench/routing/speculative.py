"""Lossless self-speculative decoding over a cascade (LayerSkip's self-speculation, on stages).

Each round, every unfinished row drafts up to ``draft_length`` tokens greedily with the first
``draft_stages`` stages through the last draft stage's exit head, one token at a time, but never
more than it has tokens left to generate (so no draft sits at a position full-depth greedy never
uses: learned position tables end where generation ends). The remaining stages then verify all
drafts in one pass, reading the draft stages' output states (nothing is computed twice). A row
keeps its longest prefix of drafts that equal the full cascade's greedy choice, plus the full
cascade's token at the first mismatch (at least one token per round); the rejected drafts' cache
slots become invalid in every stage, and slots that no row uses any more are given back at the end
of the round (at batch 1, all of them: the caches hold exactly the tokens fed). The output is
exactly full-depth greedy decoding, at any batch size, with EOS.

Cost per round: ``draft_length`` draft steps plus one verification pass over ``draft_length``
tokens, for ``min(accepted + 1, draft_length)`` tokens. The acceptance rate is accepted drafts
over drafted ones.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..measure.flops import EXTRA_FLOP_FORMULAS
from ..measure.timing import synchronize
from ..stages.ensemble import Ensemble, evaluation_mode
from ..stages.stage_cache import StageCache
from .cached_pass import cached_pass, stage_call
from .decode_steps import cut_after_eos, real_tokens


@dataclass
class SpeculativeOutput:
    """tokens: (B, N) generated ids (``pad_token_id`` after EOS); nll: (B, N) float32 NLL of each
    token under the full cascade. drafted / accepted: draft tokens proposed and kept (a row's last
    round counts only the drafts it could still use); rounds: draft-verify rounds, summed over rows;
    emitted: tokens those rounds produced (the first token comes from the prompt's pass);
    loop_rounds: rounds of the batch's loop, which runs until its slowest row is done (at batch 1,
    ``rounds``); rejections: rounds (summed over rows) in which a draft was rejected; cache_slots:
    per stage, the slots its cache holds at the end (real or not);
    seconds_per_token: decode-loop wall time / tokens generated (all rows together);
    verify_seconds: the part of it spent in verification passes; draft_seconds: the part spent
    drafting (the rest is the rounds' bookkeeping: acceptance, cache rejection)."""

    tokens: Tensor
    nll: Tensor
    drafted: int
    accepted: int
    rounds: int
    seconds_per_token: float
    verify_seconds: float
    draft_length: int
    draft_stages: int
    cache_lengths: tuple
    emitted: int
    loop_rounds: int
    cache_slots: tuple = ()
    counted_flops: Optional[int] = None
    rejections: int = 0
    draft_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else math.nan

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a row gains per round (accepted drafts plus the verifier's own token), decode only."""
        return self.emitted / self.rounds if self.rounds else math.nan


def self_speculative_generate(
    ensemble: Ensemble,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    max_new_tokens: int = 20,
    *,
    draft_length: int = 4,
    draft_stages: int = 1,
    eos_token_id: Optional[int] = None,
    pad_token_id: int = 0,
    count_flops: bool = False,
) -> SpeculativeOutput:
    """Greedy generation drafted by the first ``draft_stages`` stages and verified by the full
    cascade (see the module docstring); the tokens equal ``generate(..., method="full")``'s."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(draft_length, bool) or not isinstance(draft_length, int) or draft_length < 1:
        raise ValueError(f"draft_length must be a positive int, got {draft_length!r}")
    if isinstance(draft_stages, bool) or not isinstance(draft_stages, int) or not 1 <= draft_stages < len(ensemble):
        raise ValueError(
            f"draft_stages must be an int in [1, {len(ensemble) - 1}] (at least one stage verifies), "
            f"got {draft_stages!r}"
        )
    ensemble.validate()
    args = (ensemble, input_ids, attention_mask, max_new_tokens, draft_length, draft_stages, eos_token_id, pad_token_id)
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
            out = _speculate(*args)
        out.counted_flops = int(counter.get_total_flops())
        return out
    return _speculate(*args)


def _full_depth_prefill(stages, caches, input_ids: Tensor, real: Tensor) -> Tensor:
    """Every prompt token through every stage; the last stage's logits of each row's last token."""
    batch, prompt_len = input_ids.shape
    last_flat = torch.arange(batch, device=real.device) * prompt_len + (
        prompt_len - 1 - real.flip(1).int().argmax(dim=1)
    )
    found = {}

    def decide(k, reach, hidden, input_state, last):
        if last:
            where = torch.searchsorted(reach, last_flat)
            found["logits"] = stages[k].logits(hidden[where])
        return torch.full((reach.numel(),), last, dtype=torch.bool, device=reach.device)

    cached_pass(stages, caches, input_ids, real, "absent", "original", [False] * len(stages), decide)
    return found["logits"]


def _speculate(
    ensemble, input_ids, attention_mask, max_new_tokens, gamma, draft_stages, eos_token_id, pad_token_id
) -> SpeculativeOutput:
    device = ensemble.device
    input_ids = input_ids.to(device)
    batch = input_ids.shape[0]
    real = real_tokens(input_ids, attention_mask)
    stages = list(ensemble.stages)
    caches = [StageCache(batch, stage.num_layers, device) for stage in stages]
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    nll = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
    counts = _Counts()
    with evaluation_mode(ensemble), torch.inference_mode():
        logits = _full_depth_prefill(stages, caches, input_ids, real).float()
        first = logits.argmax(-1)
        tokens[:, 0] = first
        nll[:, 0] = -logits.log_softmax(-1).gather(1, first[:, None]).squeeze(1)
        emitted = torch.ones(batch, dtype=torch.long, device=device)
        done = (first == eos_token_id) if eos_token_id is not None else torch.zeros_like(emitted, dtype=torch.bool)
        done |= emitted >= max_new_tokens
        length = real.sum(dim=1)
        next_input = first
        synchronize(device)
        start = time.perf_counter()
        while not bool(done.all()):
            rows = (~done).nonzero().squeeze(1)
            row_span = torch.clamp(max_new_tokens - emitted[rows], max=gamma)  # never past what is left
            span = int(row_span.max())
            counts.loop_rounds += 1
            draft_start = time.perf_counter()  # the loop's condition has just synchronized
            states, drafts = _drafted(stages[:draft_stages], caches, rows, next_input, row_span, span, length)
            synchronize(device)
            verify_start = time.perf_counter()
            counts.draft_seconds += verify_start - draft_start
            full_logits, valid = _verified(stages, caches, draft_stages, rows, states, row_span, length)
            synchronize(device)
            counts.verify_seconds += time.perf_counter() - verify_start
            choice = full_logits.argmax(-1)  # equal to the drafts on the accepted prefix
            kept = ((choice == drafts) & valid).long().cumprod(dim=1).sum(dim=1)  # accepted drafts per row
            offsets = torch.arange(span, device=device)[None]
            # tokens this round: the accepted drafts and the verifier's own, cut after an EOS
            take, gain, finished = cut_after_eos(
                choice, offsets < torch.minimum(kept + 1, row_span)[:, None], eos_token_id
            )
            token_nll = -full_logits.log_softmax(-1).gather(2, choice[..., None]).squeeze(2)
            row_index, slot = rows[:, None].expand(-1, span)[take], (emitted[rows][:, None] + offsets)[take]
            tokens[row_index, slot], nll[row_index, slot] = choice[take], token_nll[take]
            for cache in caches:  # the fed inputs x_0..x_{gain-1} stay in every cache; the rest were rejected
                cache.reject(rows, gain, span)
                cache.trim()
            counts.add_round(row_span, kept, gain)
            emitted[rows] += gain
            length[rows] += gain
            next_input[rows] = choice.gather(1, (gain - 1).clamp(min=0)[:, None]).squeeze(1)
            done[rows] |= finished | (emitted[rows] >= max_new_tokens)
        synchronize(device)
        elapsed = time.perf_counter() - start
    return counts.output(tokens, nll, elapsed / max(int(emitted.sum()), 1), gamma, draft_stages, caches)


@dataclass
class _Counts:
    """What a self-speculative decode counts over its rounds."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    emitted: int = 0
    loop_rounds: int = 0
    rejections: int = 0
    verify_seconds: float = 0.0
    draft_seconds: float = 0.0

    def add_round(self, row_span: Tensor, kept: Tensor, gain: Tensor) -> None:
        """One round of the rows that drafted ``row_span`` tokens each, ``kept`` of them agreeing with
        the verifier, and gained ``gain`` tokens."""
        self.drafted += int(row_span.sum())
        self.accepted += int(torch.minimum(kept, gain).sum())
        self.rejections += int((kept < row_span).sum())
        self.rounds += row_span.numel()
        self.emitted += int(gain.sum())

    def output(
        self, tokens, nll, seconds_per_token: float, gamma: int, draft_stages: int, caches
    ) -> "SpeculativeOutput":
        return SpeculativeOutput(
            tokens=tokens,
            nll=nll,
            drafted=self.drafted,
            accepted=self.accepted,
            rounds=self.rounds,
            seconds_per_token=seconds_per_token,
            verify_seconds=self.verify_seconds,
            draft_seconds=self.draft_seconds,
            draft_length=gamma,
            draft_stages=draft_stages,
            cache_lengths=tuple(c.count.clone() for c in caches),
            emitted=self.emitted,
            loop_rounds=self.loop_rounds,
            cache_slots=tuple(c.length for c in caches),
            rejections=self.rejections,
        )


def _drafted(drafters: list, caches: list, rows: Tensor, next_input: Tensor, row_span: Tensor, span: int, length):
    """Up to ``row_span`` tokens per row, drafted greedily through the draft stages one at a time (a
    row whose span is used up sits out: its slot stays invalid); returns the last draft stage's
    states (n, span, d) and the drafted tokens (n, span)."""
    n, device = rows.numel(), rows.device  # ``span``: row_span's largest, read before the clock started
    x = next_input[rows].clone()
    states = torch.zeros(n, span, drafters[-1].hidden_size, device=device, dtype=drafters[-1].dtype)
    drafts = torch.zeros(n, span, dtype=torch.long, device=device)
    for i in range(span):
        active = (row_span > i).nonzero().squeeze(1)  # rows still drafting at step i
        position = (length[rows[active]] + i)[:, None]
        state, step_input = None, x[active]
        for k, stage in enumerate(drafters):
            inputs = {"input_ids": step_input[:, None]} if k == 0 else {"inputs_embeds": state[:, None]}
            one = torch.ones(active.numel(), 1, dtype=torch.bool, device=device)
            hidden, _ = stage_call(stage, caches[k], rows[active], one, position, False, **inputs)
            state = hidden[:, 0]
        states[active, i] = state
        x[active] = drafters[-1].logits(state).argmax(-1)
        drafts[active, i] = x[active]
    return states, drafts


def _verified(stages: list, caches: list, draft_stages: int, rows, states, row_span, length) -> tuple[Tensor, Tensor]:
    """The verifying stages on every drafted position at once: full depth's logits (n, span, V), the
    predictions f_1..f_span, and which slots are real (slots past a row's span are masked out, their
    positions repeating its last one)."""
    span, device = states.shape[1], rows.device
    valid = torch.arange(span, device=device)[None] < row_span[:, None]
    positions = length[rows][:, None] + torch.minimum(torch.arange(span, device=device)[None], row_span[:, None] - 1)
    state = states
    for j, stage in enumerate(stages[draft_stages:]):
        state, _ = stage_call(stage, caches[draft_stages + j], rows, valid, positions, False, inputs_embeds=state)
    return stages[-1].logits(state).float(), valid
