"""Lossless speculative decoding over two separate models: a draft proposes, the real model verifies.

The draft is a separate small causal LM with the real model's tokenizer (``training.distillation``
makes one), and/or prompt lookup (the row's last n-gram found earlier in its own context, the
tokens that followed it proposed; Saxena's prompt lookup decoding, as Hugging Face's
``prompt_lookup_num_tokens``). Each round, for every unfinished row:

1. Proposals. With ``lookup`` > 0, prompt lookup first (up to ``lookup`` tokens, n-grams of
   ``lookup_ngram`` down to 1 token, the latest match); rows it finds nothing for ask the draft
   model. The draft first reads the row's tokens it has not seen (its cache holds a prefix of
   the row's sequence; the tokens are fed right-aligned in one call), then drafts greedily one
   token per call, and stops when its confidence (the softmax maximum over its decode vocabulary)
   falls below ``confidence`` (the token is then not proposed) or ``draft_length`` tokens are
   drafted. No row proposes more tokens than it has left to generate minus one.
2. Verification. The real model reads each row's last token and its proposals in one call over
   its own K/V cache (rows of different lengths: invalid slots, masked, never padded to a common
   length in the cache's context). A row keeps its longest prefix of proposals equal to the real
   model's greedy choice, plus the real model's next token (so a round gains 1 to s + 1 tokens).
3. Rejected slots become invalid in both caches (and slots no row uses are given back), so each
   cache holds exactly a prefix of each row's sequence.

**Lossy variant** (``trust`` < 1): a draft-model proposal whose draft confidence is at least
``trust`` is kept even where the real model disagrees (it exits at stage 0, as in a routed cascade);
the real model still reads it in the same verification call, so its cache holds that token's keys
and values (the ``recompute`` K/V policy: an exited token's later-stage K/V are computed when a later
token reaches the stage; ``propagate`` has no meaning here, since a separate draft has no state
of the real model to propagate). ``nll`` then records each generated token's NLL under the real
model.

Without ``trust`` the output equals the real model's greedy decoding, at any batch size, with EOS (up to
float ties: verification reads several tokens per call, so its matrix products differ in shape from
a one-token step's). ``draft_vocabulary``: the draft's head is computed on those ids only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..measure.flops import EXTRA_FLOP_FORMULAS
from ..measure.timing import synchronize
from ..stages.llm import LLM
from ..stages.stage_cache import StageCache
from .cached_pass import stage_call
from .decode_steps import cut_after_eos, real_tokens


@dataclass
class DraftVerifyOutput:
    """tokens: (B, N) generated ids (``pad_token_id`` after EOS). Counts over rows and rounds:
    ``proposed`` / ``accepted`` proposals (``from_lookup``: of them, by prompt lookup; lossy: accepted
    includes the ``trusted`` ones the real model disagreed with); ``rejections``: rounds in which a
    proposal was rejected (accepted / (accepted + rejections) estimates the per-position acceptance
    probability); ``rounds``:
    verifications summed over rows; ``emitted``: tokens they produced; ``draft_calls``: calls of the
    draft model; ``verify_tokens``: slots the verifier read (real ones). Times in seconds:
    ``seconds`` (the decode loop, the prompt's pass excluded), ``verify_seconds``,
    ``draft_seconds``, ``lookup_seconds``. ``token_seconds``: per generated token, its round's time
    divided by the tokens its row gained that round (per-token latency)."""

    tokens: Tensor
    proposed: int = 0
    accepted: int = 0
    rejections: int = 0
    from_lookup: int = 0
    accepted_from_lookup: int = 0
    rounds: int = 0
    loop_rounds: int = 0
    emitted: int = 0
    draft_calls: int = 0
    verify_tokens: int = 0
    seconds: float = 0.0
    verify_seconds: float = 0.0
    draft_seconds: float = 0.0
    lookup_seconds: float = 0.0
    generated: int = 0
    trusted: int = 0
    token_seconds: list = field(default_factory=list)
    nll: Optional[Tensor] = None
    counted_flops: Optional[int] = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else math.nan

    @property
    def tokens_per_round(self) -> float:
        """Tokens a row gains per verification (accepted proposals plus the verifier's own)."""
        return self.emitted / self.rounds if self.rounds else math.nan

    @property
    def seconds_per_token(self) -> float:
        return self.seconds / max(self.generated, 1)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_drafting(target: LLM, draft: Optional[LLM], confidence, trust, draft_vocabulary) -> None:
    """ValueError naming a drafting argument of ``speculative_generate`` that does not fit: the
    confidence, a draft of another vocabulary or device, lossy trust or a draft vocabulary without a
    draft."""
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, (int, float))
        or not (0.0 <= confidence <= 1.0 or confidence == math.inf)
    ):
        raise ValueError(f"confidence must be a probability in [0, 1] (or inf: never draft), got {confidence!r}")
    if draft is not None:
        if draft.vocab_size != target.vocab_size:
            raise ValueError(
                f"the draft's vocabulary ({draft.vocab_size} ids) differs from the real model's "
                f"({target.vocab_size}); a draft must share the real model's tokenizer"
            )
        if draft.device != target.device:
            raise ValueError(f"the draft is on {draft.device}, the real model on {target.device}")
    if trust is not None:
        if isinstance(trust, bool) or not isinstance(trust, (int, float)) or not 0.0 <= trust <= 1.0:
            raise ValueError(f"trust must be a probability in [0, 1] or None (lossless), got {trust!r}")
        if draft is None:
            raise ValueError("trust (lossy drafting) needs a draft model")
    if draft_vocabulary is not None:
        if draft is None:
            raise ValueError("draft_vocabulary needs a draft model")
        if draft_vocabulary.ndim != 1 or not bool(
            ((draft_vocabulary >= 0) & (draft_vocabulary < target.vocab_size)).all()
        ):
            raise ValueError(f"draft_vocabulary must be a 1-D tensor of ids in [0, {target.vocab_size})")


def speculative_generate(
    target: LLM,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    max_new_tokens: int = 20,
    *,
    draft: Optional[LLM] = None,
    draft_length: int = 2,
    confidence: float = 0.0,
    draft_vocabulary: Optional[Tensor] = None,
    lookup: int = 0,
    lookup_ngram: int = 2,
    trust: Optional[float] = None,
    eos_token_id: Optional[int] = None,
    pad_token_id: int = 0,
    count_flops: bool = False,
) -> DraftVerifyOutput:
    """Greedy generation with ``target``, proposals from ``draft`` and/or prompt lookup (module doc)."""
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("draft_length", draft_length, 1)
    _check_int("lookup", lookup, 0)
    _check_int("lookup_ngram", lookup_ngram, 1)
    if draft is None and lookup == 0:
        raise ValueError("speculative_generate needs a draft model, prompt lookup (lookup > 0), or both")
    _check_drafting(target, draft, confidence, trust, draft_vocabulary)
    args = (target, draft, input_ids, attention_mask, max_new_tokens, draft_length, float(confidence))
    kwargs = dict(
        vocabulary=draft_vocabulary, lookup=lookup, ngram=lookup_ngram, trust=trust, eos=eos_token_id, pad=pad_token_id
    )
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
            out = _run(*args, **kwargs)
        out.counted_flops = int(counter.get_total_flops())
        return out
    return _run(*args, **kwargs)


def lookup_proposals(history: list[int], ngram: int, limit: int) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the last n-gram of
    ``history`` (n from ``ngram`` down to 1), at most ``limit``; [] when no n-gram recurs."""
    size = len(history)
    for n in range(min(ngram, size - 1), 0, -1):
        tail = history[size - n :]
        for start in range(size - n - 1, -1, -1):
            if history[start : start + n] == tail:
                follow = history[start + n : start + n + limit]
                if follow:
                    return follow
    return []


class _DraftState:
    """The draft model's cache and how many of each row's tokens it holds."""

    def __init__(self, draft: LLM, batch: int, vocabulary: Optional[Tensor]):
        self.model = draft
        self.cache = StageCache(batch, draft.num_layers, draft.device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=draft.device)
        self.head = None if vocabulary is None else draft.lm_head.weight[vocabulary.to(draft.device)]
        self.ids = None if vocabulary is None else vocabulary.to(draft.device)

    def pick(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """(token ids, confidence) of the draft's greedy choice for final states (n, d)."""
        if self.head is None:
            probs = self.model.logits(hidden).float().softmax(-1)
            conf, token = probs.max(-1)
            return token, conf
        probs = (hidden @ self.head.T).float().softmax(-1)
        conf, index = probs.max(-1)
        return self.ids[index], conf


def _run(
    target, draft, input_ids, attention_mask, max_new, gamma, threshold, vocabulary, lookup, ngram, trust, eos, pad
):
    device = target.device
    input_ids = input_ids.to(device)
    batch = input_ids.shape[0]
    real = real_tokens(input_ids, attention_mask)
    out = DraftVerifyOutput(tokens=torch.full((batch, max_new), pad, dtype=torch.long, device=device))
    if trust is not None:
        out.nll = torch.zeros(batch, max_new, dtype=torch.float32, device=device)
    history, length, lists = _histories(input_ids, real, max_new)
    target_cache = StageCache(batch, target.num_layers, device)
    drafter = _DraftState(draft, batch, vocabulary) if draft is not None else None
    with torch.inference_mode():
        _read_prompt(target, target_cache, drafter, input_ids, real, length)
        emitted = torch.zeros(batch, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        synchronize(device)
        start = time.perf_counter()
        while not bool(done.all()):
            round_start = time.perf_counter()
            rows = (~done).nonzero().squeeze(1)
            out.loop_rounds += 1
            room = (max_new - emitted[rows]).tolist()
            proposals, confident, lookup_rows = _proposals(
                drafter, rows, lists, history, length, room, lookup, ngram, gamma, threshold, trust, out
            )
            synchronize(device)
            begin = time.perf_counter()
            verdict = _verify(target, target_cache, rows, history, length, proposals, confident, trust, eos)
            synchronize(device)
            out.verify_seconds += time.perf_counter() - begin
            out.verify_tokens += int(verdict.valid.sum())
            if drafter is not None:
                _rewind(drafter, rows, length, verdict.gain)  # before ``length`` moves on
            _keep(out, verdict, rows, emitted, history, length, lists, proposals, lookup_rows)
            done[rows] |= verdict.finished | (emitted[rows] >= max_new)
            synchronize(device)
            elapsed = time.perf_counter() - round_start
            out.token_seconds.extend(elapsed / g for g in verdict.gain.tolist() if g for _ in range(g))
        synchronize(device)
        out.seconds = time.perf_counter() - start
    out.generated = int(emitted.sum())
    return out


def _histories(input_ids: Tensor, real: Tensor, max_new: int) -> tuple[Tensor, Tensor, list[list[int]]]:
    """Each row's sequence so far (its real prompt tokens left-aligned, room for ``max_new`` more),
    its length, and the same as Python lists (what prompt lookup searches)."""
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    history = torch.zeros(batch, prompt_len + max_new, dtype=torch.long, device=device)
    length = real.sum(dim=1)
    order = torch.argsort((~real).long(), dim=1, stable=True)
    history[:, :prompt_len] = input_ids.gather(1, order) * (
        torch.arange(prompt_len, device=device)[None] < length[:, None]
    )
    return history, length, [history[r, : int(length[r])].tolist() for r in range(batch)]


def _read_prompt(target, target_cache: StageCache, drafter, input_ids: Tensor, real: Tensor, length: Tensor) -> None:
    """Every real prompt token but the last through the real model and the draft (the last is read
    with the first round's proposals, or by the draft when it first drafts), outside the timed loop."""
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    all_rows = torch.arange(batch, device=device)
    positions = (torch.cumsum(real.long(), dim=1) - 1).clamp(min=0)
    last = prompt_len - 1 - real.flip(1).int().argmax(dim=1)
    before_last = real & (torch.arange(prompt_len, device=device)[None] != last[:, None])
    if not bool(before_last.any()):
        return
    stage_call(target, target_cache, all_rows, before_last, positions, False, input_ids=input_ids)
    target_cache.trim()
    if drafter is not None:
        stage_call(drafter.model, drafter.cache, all_rows, before_last, positions, False, input_ids=input_ids)
        drafter.cache.trim()
        drafter.seen = (length - 1).clone()


def _proposals(drafter, rows, lists, history, length, room, lookup, ngram, gamma, threshold, trust, out) -> tuple:
    """One round's proposals per row (prompt lookup first, then the draft for the rows lookup left
    empty), which draft proposals lossy drafting keeps regardless (at ``trust``), and which rows'
    proposals came from lookup; the seconds each took are added to ``out``."""
    n = rows.numel()
    proposals: list[list[int]] = [[] for _ in range(n)]
    confident: list[list[bool]] = [[] for _ in range(n)]  # lossy: proposals kept regardless
    lookup_rows = [False] * n
    if lookup:
        begin = time.perf_counter()
        for i, r in enumerate(rows.tolist()):
            found = lookup_proposals(lists[r], ngram, min(lookup, room[i] - 1))
            proposals[i], lookup_rows[i] = found, bool(found)
        out.lookup_seconds += time.perf_counter() - begin
    wants = [i for i in range(n) if not lookup_rows[i] and room[i] > 1] if drafter is not None else []
    if wants:
        synchronize(rows.device)
        begin = time.perf_counter()
        drafted = _draft(drafter, rows, wants, history, length, room, gamma, threshold, out)
        for i, (tokens, levels) in zip(wants, drafted):
            proposals[i] = tokens
            if trust is not None:
                confident[i] = [level >= trust for level in levels]
        synchronize(rows.device)
        out.draft_seconds += time.perf_counter() - begin
    return proposals, confident, lookup_rows


@dataclass
class _Verdict:
    """The real model's verdict on one round: its token after each slot (``choice``, (n, width)),
    its logits, which slots were fed (``valid``) and are taken (``take``), the proposals it agreed
    with per row (``kept``), the tokens each row gains, and the rows that reached EOS."""

    choice: Tensor
    logits: Tensor
    valid: Tensor
    take: Tensor
    kept: Tensor
    gain: Tensor
    finished: Tensor
    #: lossy drafting: tokens kept though the real model disagreed (after the EOS cut)
    trusted: int = 0


def _verify(target, target_cache: StageCache, rows, history, length, proposals, confident, trust, eos) -> _Verdict:
    """Each row's last token and its proposals in one call of the real model; the longest agreeing
    prefix of proposals is kept (lossy drafting also keeps the confident ones), cut after an EOS, and
    the cache keeps the row's last token and its accepted proposals."""
    n, device = rows.numel(), rows.device
    sizes = torch.tensor([len(p) for p in proposals], dtype=torch.long, device=device)
    width = int(sizes.max()) + 1
    fed = torch.zeros(n, width, dtype=torch.long, device=device)
    fed[:, 0] = history[rows, length[rows] - 1]
    for i, p in enumerate(proposals):
        if p:
            fed[i, 1 : 1 + len(p)] = torch.tensor(p, device=device)
    offsets = torch.arange(width, device=device)[None]
    valid = offsets <= sizes[:, None]
    position = (length[rows] - 1)[:, None] + torch.minimum(offsets, sizes[:, None])
    hidden, _ = stage_call(target, target_cache, rows, valid, position, False, input_ids=fed)
    logits = target.logits(hidden)
    choice = logits.argmax(-1)  # (n, width): the real model's token after each slot
    matches = agreeing = choice[:, :-1] == fed[:, 1:]
    if trust is not None:
        kept_anyway = torch.zeros_like(matches)
        for i, levels in enumerate(confident):
            if levels:
                kept_anyway[i, : len(levels)] = torch.tensor(levels, device=device)
        matches = matches | kept_anyway
        choice = torch.cat([torch.where(matches, fed[:, 1:], choice[:, :-1]), choice[:, -1:]], dim=1)
    agree = (matches & valid[:, 1:]).long().cumprod(dim=1)
    kept = agree.sum(dim=1)
    take, gain, finished = cut_after_eos(choice, offsets < (kept + 1)[:, None], eos)
    target_cache.reject(rows, gain, width)  # keeps the row's last token and its accepted proposals
    target_cache.trim()
    trusted = int((take[:, 1:] & agree.bool() & ~agreeing).sum()) if trust is not None else 0
    return _Verdict(choice, logits, valid, take, kept, gain, finished, trusted)


def _keep(out, verdict: _Verdict, rows, emitted, history, length, lists, proposals, lookup_rows) -> None:
    """Write what the real model took this round: the tokens (and their NLL) into ``out`` and the
    histories, and the counts of proposals, acceptances, rejections, lookup's share, trusted
    tokens; advances ``emitted`` and ``length``."""
    choice, take, gain, kept = verdict.choice, verdict.take, verdict.gain, verdict.kept
    width = choice.shape[1]
    offsets = torch.arange(width, device=choice.device)[None]
    out.trusted += verdict.trusted
    row_index = rows[:, None].expand(-1, width)[take]
    out.tokens[row_index, (emitted[rows][:, None] + offsets)[take]] = choice[take]
    history[row_index, (length[rows][:, None] + offsets)[take]] = choice[take]
    if out.nll is not None:
        token_nll = -verdict.logits.float().log_softmax(-1).gather(2, choice[..., None]).squeeze(2)
        out.nll[row_index, (emitted[rows][:, None] + offsets)[take]] = token_nll[take]
    gained = gain.tolist()
    for i, r in enumerate(rows.tolist()):
        lists[r].extend(choice[i, : gained[i]].tolist())
        used = min(int(kept[i]), gained[i])
        out.proposed += len(proposals[i])
        out.accepted += used
        out.rejections += int(int(kept[i]) < len(proposals[i]))
        if lookup_rows[i]:
            out.from_lookup += len(proposals[i])
            out.accepted_from_lookup += used
    emitted[rows] += gain
    length[rows] += gain
    out.rounds += rows.numel()
    out.emitted += int(gain.sum())


def _draft(state: _DraftState, rows: Tensor, wants: list[int], history, length, room, gamma, threshold, out):
    """Draft for the rows ``rows[wants]``: read their unseen tokens, then draft greedily (module doc)."""
    device = history.device
    picked = rows[torch.tensor(wants, device=device)]
    limit = torch.tensor([min(gamma, room[i] - 1) for i in wants], device=device)
    seen, total = state.seen[picked], length[picked]
    unseen = total - seen
    width = int(unseen.max())
    # right-aligned: the last slot of every row is its latest token
    offsets = torch.arange(width, device=device)[None]
    valid = offsets >= (width - unseen)[:, None]
    position = (seen[:, None] + offsets - (width - unseen)[:, None]).clamp(min=0)
    ids = history[picked[:, None], position] * valid
    hidden, _ = stage_call(state.model, state.cache, picked, valid, position, False, input_ids=ids)
    state.seen[picked] = total
    out.draft_calls += 1
    tokens, conf = state.pick(hidden[:, -1])
    drafts = [[] for _ in wants]
    levels = [[] for _ in wants]
    active = torch.ones(len(wants), dtype=torch.bool, device=device)
    for step in range(gamma):
        active &= (conf >= threshold) & (limit > step)
        if not bool(active.any()):
            break
        for j in active.nonzero().squeeze(1).tolist():
            drafts[j].append(int(tokens[j]))
            levels[j].append(float(conf[j]))
        if step + 1 >= int(limit[active].max()):
            break  # no active row may draft more: the last proposal needs no draft call
        going = active & (limit > step + 1)
        where = going.nonzero().squeeze(1)
        hidden, _ = stage_call(
            state.model,
            state.cache,
            picked[where],
            torch.ones(where.numel(), 1, dtype=torch.bool, device=device),
            (total[where] + step)[:, None],
            False,
            input_ids=tokens[where][:, None],
        )
        out.draft_calls += 1
        state.seen[picked[where]] += 1
        next_tokens, next_conf = state.pick(hidden[:, 0])
        tokens = tokens.clone()
        conf = torch.zeros_like(conf)
        tokens[where], conf[where] = next_tokens, next_conf
        active = going
    return list(zip(drafts, levels))


def _rewind(state: _DraftState, rows: Tensor, length: Tensor, gain: Tensor) -> None:
    """After verification: the draft's cache keeps only tokens of the row's sequence."""
    accepted_len = length[rows] + gain - 1  # the sequence now, less the newest token (never fed)
    over = (state.seen[rows] - accepted_len).clamp(min=0)  # fed drafts that were rejected
    if bool(over.any()):
        cache = state.cache
        # a row's rejected drafts are its last `over` real slots: drop them
        for i in over.nonzero().squeeze(1).tolist():
            r = int(rows[i])
            real_slots = cache.valid[r, : cache.length].nonzero().squeeze(1)
            drop = real_slots[-int(over[i]) :]
            cache.valid[r, drop] = False
            cache.count[r] -= drop.numel()
        cache.has_gaps = True
        cache.trim()
    state.seen[rows] = torch.minimum(state.seen[rows], accepted_len)


def calibrate_confidence(
    draft: LLM,
    target: LLM,
    windows: Tensor,
    cost: float,
    vocabulary: Optional[Tensor] = None,
    bins: int = 10,
) -> tuple[float, list[tuple[float, float]]]:
    """The draft confidence below which a row stops drafting: teacher-forced on ``windows`` (W, T),
    tokens are cut into ``bins`` equal-count bins by the draft's confidence, and the threshold is
    the lower edge of the least confident bin from which every more confident bin agrees with the
    real model's top-1 at least ``cost`` of the time (a drafted token then pays for its draft call,
    ``cost`` being that call's share of a plain step). ``math.inf`` (never draft) when no bin does. Returns
    (threshold, [(bin's lower edge, its agreement)] from the most confident bin down)."""
    if not 0.0 <= cost:
        raise ValueError(f"cost must be >= 0, got {cost!r}")
    state = _DraftState(draft, 0, vocabulary)  # its head only: no cache rows
    levels, agreeing = [], []
    with torch.inference_mode():
        for row in windows.to(target.device):
            ids = row[None]
            wanted = target.logits(target(input_ids=ids).hidden).argmax(-1)[0]
            token, conf = state.pick(draft(input_ids=ids).hidden[0])
            levels.append(conf.float().cpu())
            agreeing.append((token == wanted).float().cpu())
    conf, agree = torch.cat(levels), torch.cat(agreeing)
    order = torch.argsort(conf, descending=True)
    curve = []
    threshold = math.inf
    for chunk in torch.tensor_split(order, bins):
        if chunk.numel() == 0:
            continue
        edge, rate = float(conf[chunk].min()), float(agree[chunk].mean())
        curve.append((edge, rate))
        if rate < cost:
            break
        threshold = edge
    return threshold, curve
