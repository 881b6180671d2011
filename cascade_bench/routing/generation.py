"""Early-exit generation with one KV cache per stage (docs/design.md section 1, Generation).

The prompt is prefilled with the same routing as teacher forcing (``cached_pass``); then every
new token runs through stage 0 and onwards until it exits, and the next token comes from the
logits of its exit stage. Sequences in a batch exit at different stages at every step: each
stage runs only the rows whose token reached it (a gather per step), with ragged cache lengths
kept as a validity mask.

Batch exit policies (``EXIT_POLICIES``) say how the rows of one decode step exit:

- ``"per_token"``: each row by its own confidence (the rule above).
- ``"batch"``: at each stage the active rows exit together when at least a fraction ``quorum`` of
  them is confident, else all continue (``quorum=1.0``: all must be). No row waits for a gather.
- ``"schedule"`` (after SkipDecode): decode step i exits every row at ``exit_schedule[i]``, a
  non-increasing sequence of stages (its last value repeats), and the prompt runs at full depth;
  a later token never exits deeper than an earlier one, so no cache misses an entry it needs,
  and no exit rule is computed at all.

K/V policies (``cached_pass.KV_POLICIES``) say what a later stage's cache holds for a token that
exited before it: nothing (``absent``: stage k attends over the tokens that reached it, at compact
positions 0..n-1 or their original positions), the keys/values of its exit state
(``propagate``), or the real thing, computed once a later token of the row reaches the stage
(``recompute``). Each has the same meaning here as in teacher forcing (invariant 4 per policy).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..measure.flops import EXTRA_FLOP_FORMULAS
from ..measure.timing import synchronize
from ..stages.ensemble import Ensemble, evaluation_mode
from ..stages.key_values import propagated_key_values
from ..stages.stage_cache import StageCache
from .cached_pass import Pending, cached_pass, check_kv_policy, stage_call
from .decode_steps import real_tokens
from .passes import resolve_thresholds

EXIT_POLICIES = ("per_token", "batch", "schedule")


@dataclass
class GenerationOutput:
    """tokens: (B, N) generated ids (``pad_token_id`` after a sequence's EOS); nll: (B, N) float32
    negative log-likelihood of each generated token under the distribution it was drawn from (its
    exit stage's); exit_stage: (B, N) stage whose logits produced each token; cache_lengths: per
    stage, (B,) tokens held in that stage's cache; plus the cost of the decode phase: exit_counts
    per stage and layer_cost over the ``decode_tokens`` fed back after the prompt (recomputed
    tokens count as computed), stage_rows (steps, S) rows that ran each stage at each decode step,
    recomputed_tokens / propagated_tokens per stage (K/V policies), and seconds_per_token = wall
    time of the decode loop (after prefill; CUDA synchronised at both ends) / tokens generated, all
    rows together (its inverse is the decode throughput)."""

    tokens: Tensor
    nll: Tensor
    exit_stage: Tensor
    cache_lengths: tuple
    exit_counts: tuple
    layer_cost: float
    seconds_per_token: float
    decode_tokens: int
    counted_flops: Optional[int] = None
    stage_rows: Optional[Tensor] = None
    recomputed_tokens: tuple = ()
    propagated_tokens: tuple = ()
    exit_policy: str = "per_token"
    kv_policy: str = "absent"


@dataclass(frozen=True)
class _Sampling:
    """How a token is picked: greedily, or sampled at ``temperature`` from the ``top_k`` / ``top_p``
    tokens with ``generator``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None


def _pick(logits: Tensor, sampling: _Sampling) -> tuple[Tensor, Tensor]:
    """Next token per row and its NLL under the distribution it was drawn from (float32)."""
    logits = logits.float()
    top_k, top_p = sampling.top_k, sampling.top_p
    if sampling.do_sample:
        logits = logits / sampling.temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -math.inf)
        log_p = logits.log_softmax(-1)
        token = torch.multinomial(log_p.exp(), 1, generator=sampling.generator).squeeze(1)
    else:
        log_p = logits.log_softmax(-1)
        token = logits.argmax(-1)
    return token, -log_p.gather(1, token[:, None]).squeeze(1)


def check_exit_schedule(schedule, num_stages: int) -> tuple[int, ...]:
    """A non-empty, non-increasing sequence of stage indices in [0, num_stages)."""
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not len(schedule):
        raise ValueError(f"exit_schedule must be a non-empty sequence of stage indices, got {schedule!r}")
    values = list(schedule)
    if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < num_stages for v in values):
        raise ValueError(f"exit_schedule holds stage indices in [0, {num_stages}), got {values!r}")
    if any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(f"exit_schedule must be non-increasing (a later token never exits deeper), got {values!r}")
    return tuple(values)


def generate(
    ensemble: Ensemble,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    max_new_tokens: int = 20,
    *,
    method: str = "routed",
    thresholds: Optional[Sequence[float]] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[int] = None,
    pad_token_id: int = 0,
    positions: str = "compact",
    generator: Optional[torch.Generator] = None,
    count_flops: bool = False,
    exit_policy: str = "per_token",
    quorum: float = 1.0,
    exit_schedule: Optional[Sequence[int]] = None,
    kv_policy: str = "absent",
) -> GenerationOutput:
    """Generate ``max_new_tokens`` per sequence with true early exit (``method="routed"``) or at full
    depth (``method="full"``: every token through every stage, one ``lm_head`` at the end).

    input_ids, attention_mask: (B, P) prompts, left or right padded. Greedy by default; sampling
    with temperature, top-k and top-p. A sequence stops after ``eos_token_id``. ``count_flops``
    runs the whole call under FlopCounterMode (its time per token then includes counting).
    exit_policy / quorum / exit_schedule and kv_policy: see the module docstring.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    plan = _Plan.of(ensemble, method, thresholds, positions, exit_policy, quorum, exit_schedule, kv_policy)
    sampling = _Sampling(do_sample, temperature, top_k, top_p, generator)
    args = (ensemble, input_ids, attention_mask, max_new_tokens, plan, sampling, eos_token_id, pad_token_id)
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
            out = _generate(*args)
        out.counted_flops = int(counter.get_total_flops())
        return out
    return _generate(*args)


@dataclass(frozen=True)
class _Plan:
    """How one generate call routes: thresholds per stage and the policies."""

    levels: tuple
    positions: str
    exit_policy: str
    quorum: float
    schedule: Optional[tuple]
    kv_policy: str

    @classmethod
    def of(cls, ensemble, method, thresholds, positions, exit_policy, quorum, exit_schedule, kv_policy) -> "_Plan":
        """The plan of a ``generate`` call's arguments (ValueError naming a bad one): the thresholds
        (all infinite at full depth, and for the schedule's prompt), the policies and the schedule."""
        if method not in ("routed", "full"):
            raise ValueError(f"method must be 'routed' or 'full', got {method!r}")
        if positions not in ("compact", "original"):
            raise ValueError(f"positions must be 'compact' or 'original', got {positions!r}")
        if exit_policy not in EXIT_POLICIES:
            raise ValueError(f"exit_policy must be one of {EXIT_POLICIES}, got {exit_policy!r}")
        if isinstance(quorum, bool) or not isinstance(quorum, (int, float)) or not 0.0 < quorum <= 1.0:
            raise ValueError(f"quorum must be a fraction in (0, 1], got {quorum!r}")
        check_kv_policy(kv_policy)
        ensemble.validate()
        schedule = None
        if exit_policy == "schedule":
            if exit_schedule is None:
                raise ValueError("exit_policy='schedule' needs exit_schedule (one exit stage per decode step)")
            schedule = check_exit_schedule(exit_schedule, len(ensemble))
        elif exit_schedule is not None:
            raise ValueError(f"exit_schedule is only read with exit_policy='schedule', got exit_policy={exit_policy!r}")
        levels = resolve_thresholds(ensemble, thresholds, len(ensemble))
        if method == "full" or schedule is not None:  # the schedule's prompt runs at full depth
            levels = tuple(math.inf for _ in levels)
        if method == "full":
            schedule = None
        return cls(levels, positions, exit_policy, float(quorum), schedule, kv_policy)

    def forced_stage(self, step: int) -> Optional[int]:
        if self.schedule is None:
            return None
        return self.schedule[min(step, len(self.schedule) - 1)]


def _generate(
    ensemble,
    input_ids,
    attention_mask,
    max_new_tokens,
    plan: _Plan,
    sampling: _Sampling,
    eos_token_id,
    pad_token_id,
) -> GenerationOutput:
    device = ensemble.device
    input_ids = input_ids.to(device)
    batch, prompt_len = input_ids.shape
    real = real_tokens(input_ids, attention_mask)
    stages = list(ensemble.stages)
    caches, pending = _new_caches(stages, batch, device, plan.kv_policy)
    with evaluation_mode(ensemble), torch.inference_mode():
        logits, produced_by = _prefill(stages, caches, input_ids, real, plan, pending)
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        nll = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
        exit_stage = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
        every_row = torch.arange(batch, device=device)
        rows, alive, all_alive = every_row, torch.ones(batch, dtype=torch.bool, device=device), True
        step_rows: list[list[int]] = []
        extra = [[0] * len(stages), [0] * len(stages)]  # recomputed, propagated
        fed = 0
        length = real.sum(dim=1)  # tokens so far per row (original positions)
        synchronize(device)
        start = time.perf_counter()
        for step in range(max_new_tokens):
            token, token_nll = _pick(logits, sampling)
            if all_alive:
                tokens[:, step], nll[:, step], exit_stage[:, step] = token, token_nll, produced_by
            else:
                for written, value in ((tokens, token), (nll, token_nll), (exit_stage, produced_by)):
                    written[alive, step] = value[alive]
            if eos_token_id is not None:
                alive = alive & (token != eos_token_id)
                still = int(alive.sum())
                if still == 0:
                    break
                all_alive = still == batch
                rows = every_row if all_alive else alive.nonzero().squeeze(1)
            if step == max_new_tokens - 1:
                break
            logits, produced_by, counts = _decode_step(
                stages, caches, token, rows, length, plan, plan.forced_stage(step), pending, extra
            )
            if all_alive:
                length += 1
            else:
                length[rows] += 1
            fed += rows.numel()
            step_rows.append(counts)
        synchronize(device)
        elapsed = time.perf_counter() - start
    return _output(stages, caches, plan, tokens, nll, exit_stage, step_rows, extra, fed, elapsed)


def _new_caches(stages: list, batch: int, device, kv_policy: str) -> tuple[list, Optional[list]]:
    """An empty cache per stage, and under ``recompute`` per stage past the first the tokens left
    waiting to enter it (None otherwise)."""
    caches = [StageCache(batch, stage.num_layers, device) for stage in stages]
    if kv_policy != "recompute":
        return caches, None
    return caches, [None] + [
        Pending(batch, stages[k - 1].hidden_size, device, stages[k - 1].dtype) for k in range(1, len(stages))
    ]


def _output(stages, caches, plan, tokens, nll, exit_stage, step_rows, extra, fed: int, elapsed: float):
    """The ``GenerationOutput`` of a decode: its tokens, their NLL and exit stages, and the counts
    (exits per stage, layer cost over the ``fed`` decode tokens, recomputed and propagated tokens)."""
    layers = [s.num_layers for s in stages]
    reached = [sum(c[k] for c in step_rows) for k in range(len(stages))]
    exits = [reached[k] - (reached[k + 1] if k + 1 < len(stages) else 0) for k in range(len(stages))]
    computed = [n + r for n, r in zip(reached, extra[0])]
    generated = int((exit_stage >= 0).sum())
    return GenerationOutput(
        tokens=tokens,
        nll=nll,
        exit_stage=exit_stage,
        cache_lengths=tuple(c.count.clone() for c in caches),
        exit_counts=tuple(exits),
        layer_cost=(sum(n * l for n, l in zip(computed, layers)) / (fed * sum(layers)) if fed else math.nan),
        seconds_per_token=elapsed / max(generated, 1),
        decode_tokens=fed,
        stage_rows=torch.tensor(step_rows, dtype=torch.long).reshape(-1, len(stages)),
        recomputed_tokens=tuple(extra[0]),
        propagated_tokens=tuple(extra[1]),
        exit_policy=plan.exit_policy,
        kv_policy=plan.kv_policy,
    )


def _decide(stage, hidden: Tensor, input_state: Optional[Tensor], threshold: float) -> tuple[Tensor, Optional[Tensor]]:
    """Exit mask (n,) for one token per row at a non-last stage, and every row's logits (n, V) when
    the rule needed them to decide (None otherwise: the head then runs for exiting rows only)."""
    fn = stage.exit_rule
    logits = stage.logits(hidden) if fn.needs_logits else None
    return fn(input_state, hidden, logits.float() if logits is not None else None) >= threshold, logits


def _capture(stage, k: int, last: bool, plan: _Plan) -> bool:
    return not last and plan.levels[k] != math.inf and plan.schedule is None and stage.exit_rule.needs_input_state


def _prefill(stages, caches, input_ids, real, plan: _Plan, pending) -> tuple[Tensor, Tensor]:
    """Route the prompts as teacher forcing does (``cached_pass``), filling each stage's cache; return
    the logits of each row's last prompt token at its exit stage and that stage."""
    batch, prompt_len = input_ids.shape
    last_flat = torch.arange(batch, device=real.device) * prompt_len + (
        prompt_len - 1 - real.flip(1).int().argmax(dim=1)
    )  # index of each row's last real token
    is_last_token = torch.zeros(batch * prompt_len, dtype=torch.bool, device=real.device)
    is_last_token[last_flat] = True
    found: dict = {"logits": None}
    out_stage = torch.full((batch,), -1, dtype=torch.long, device=real.device)

    def decide(k: int, reach: Tensor, hidden: Tensor, input_state: Optional[Tensor], last: bool) -> Tensor:
        stage = stages[k]
        if last or plan.levels[k] == math.inf:
            exits = torch.full((reach.numel(),), last, dtype=torch.bool, device=reach.device)
        else:
            exits, _ = _decide(stage, hidden, input_state, plan.levels[k])
        leaving_last = exits & is_last_token[reach]
        if bool(leaving_last.any()):
            logits = stage.logits(hidden[leaving_last])
            if found["logits"] is None:
                found["logits"] = logits.new_zeros(batch, logits.shape[-1])
            seq = torch.div(reach[leaving_last], prompt_len, rounding_mode="floor")
            found["logits"][seq] = logits
            out_stage[seq] = k
        return exits

    capture = [_capture(stage, k, k == len(stages) - 1, plan) for k, stage in enumerate(stages)]
    cached_pass(stages, caches, input_ids, real, plan.kv_policy, plan.positions, capture, decide, pending)
    return found["logits"], out_stage


def _decode_step(
    stages, caches, token: Tensor, rows: Tensor, length: Tensor, plan: _Plan, forced: Optional[int], pending, extra
) -> tuple[Tensor, Tensor, list[int]]:
    """Feed one new token for each row in ``rows``; return next-token logits (B, V) and the stage
    that produced them (B,) (zeros and -1 for rows not in ``rows``), and how many rows ran each
    stage. A stage where every row or no row exits costs no gather: one host sync per stage to
    learn how many exit, index copies only when the rows split. ``forced``: the stage every row
    exits at (schedule policy). ``extra``: [recomputed, propagated] tokens per stage, added to."""
    batch = token.shape[0]
    counts = [0] * len(stages)
    exited: list[tuple[Tensor, Tensor, int]] = []  # (rows, their logits, stage)
    gone: list[tuple[Tensor, Tensor]] = []  # propagate: (rows, exit states) of rows that exited this step
    state = None
    active = rows
    for k, stage in enumerate(stages):
        last = k == len(stages) - 1
        cache = caches[k]
        n = active.numel()
        if n == 0:
            if plan.kv_policy != "propagate":
                break
            extra[1][k] += _propagate(stage, cache, gone, length, called=False)
            continue
        counts[k] = n
        whole = n == batch
        capture = _capture(stage, k, last, plan)
        fed = token if k == 0 else state
        hidden, input_state, position, new_valid, newest = _stage_step(
            stage, cache, k, active, whole, fed, length, plan, pending, capture
        )
        if plan.kv_policy == "recompute" and k > 0:
            extra[0][k] += int(newest.sum())
        if plan.kv_policy == "recompute" and not last:
            pending[k + 1].push(active, hidden, position, new_valid)
        if plan.kv_policy == "propagate" and gone:
            extra[1][k] += _propagate(stage, cache, gone, length, called=True)
        at = torch.arange(n, device=active.device)
        hidden = hidden[at, newest]
        if last:
            exited.append((active, stage.logits(hidden), k))
            break
        exits, stage_logits, leaving = _leaving(
            stage, k, plan, forced, hidden, input_state[at, newest] if capture else None
        )
        if leaving == 0:
            state = hidden
            continue
        if leaving == n:
            exited.append((active, stage_logits if stage_logits is not None else stage.logits(hidden), k))
            gone.append((active, hidden))
            active = active[:0]
            continue
        out, stay = exits.nonzero().squeeze(1), (~exits).nonzero().squeeze(1)
        exited.append((active[out], stage_logits[out] if stage_logits is not None else stage.logits(hidden[out]), k))
        gone.append((active[out], hidden[out]))
        active, state = active[stay], hidden[stay]
    return (*_step_logits(exited, batch), counts)


def _stage_step(stage, cache, k: int, active: Tensor, whole: bool, fed: Tensor, length: Tensor, plan, pending, capture):
    """Stage ``k``'s call for the ``active`` rows of one decode step (``whole``: every row): the new
    token (``fed``: its ids at stage 0, else the state it reached this stage with), or under
    ``recompute`` past stage 0 the tokens left waiting to enter it. Returns (hidden, input state,
    position ids, which slots are new, the index of each row's newest slot)."""
    if plan.kv_policy == "recompute" and k > 0:
        states, position, new_valid = pending[k].take(active)
        hidden, input_state = stage_call(stage, cache, active, new_valid, position, capture, inputs_embeds=states)
        return hidden, input_state, position, new_valid, new_valid.sum(dim=1) - 1
    if plan.kv_policy == "absent" and plan.positions == "compact":
        position = cache.count if whole else cache.count[active]
    else:
        position = length if whole else length[active]
    position = position[:, None]
    n = active.numel()
    new_valid = torch.ones(n, 1, dtype=torch.bool, device=active.device)
    inputs = {"input_ids": (fed if whole else fed[active])[:, None]} if k == 0 else {"inputs_embeds": fed[:, None]}
    hidden, input_state = stage_call(stage, cache, active, new_valid, position, capture, **inputs)
    return hidden, input_state, position, new_valid, torch.zeros(n, dtype=torch.long, device=active.device)


def _leaving(stage, k: int, plan, forced: Optional[int], hidden: Tensor, input_state: Optional[Tensor]) -> tuple:
    """(exit mask or None, the logits the rule computed or None, how many rows leave) at non-last
    stage ``k``: all or none where the stage is forced or never exits, else the rule's decision
    (under the batch policy, all rows once the quorum of them would exit)."""
    n = hidden.shape[0]
    if forced is not None or plan.levels[k] == math.inf:  # no exit rule computed here
        return None, None, n if forced == k else 0
    exits, stage_logits = _decide(stage, hidden, input_state, plan.levels[k])
    leaving = int(exits.sum())
    if plan.exit_policy == "batch":
        leaving = n if leaving >= plan.quorum * n else 0
    return exits, stage_logits, leaving


def _step_logits(exited: list[tuple[Tensor, Tensor, int]], batch: int) -> tuple[Tensor, Tensor]:
    """Every row's next-token logits (B, V) and the stage that produced them (-1 for rows that did not
    run), from the (rows, logits, stage) of each exit; no scatter when all rows left at one stage."""
    if len(exited) == 1 and exited[0][0].numel() == batch:  # every row exited at one stage
        _, logits, k = exited[0]
        return logits, torch.full((batch,), k, dtype=torch.long, device=logits.device)
    logits = exited[0][1].new_zeros(batch, exited[0][1].shape[-1])
    produced_by = torch.full((batch,), -1, dtype=torch.long, device=logits.device)
    for where, stage_logits, k in exited:
        logits[where] = stage_logits
        produced_by[where] = k
    return logits, produced_by


def _propagate(stage, cache: StageCache, gone: list[tuple[Tensor, Tensor]], length: Tensor, called: bool) -> int:
    """Write the keys/values of this step's exit states of rows that left before ``stage`` into its
    cache: into the slot the stage's call just added (rows that did not run it got it invalid), or
    into a new slot when no row ran it. Returns how many rows it wrote."""
    rows = torch.cat([r for r, _ in gone])
    states = torch.cat([s for _, s in gone])
    rows, order = rows.sort()
    states = states[order]
    key_values = propagated_key_values(stage, states[:, None], length[rows][:, None])
    if called:
        cache.fill_last(rows, key_values)
    else:
        cache.append(rows, key_values, torch.ones(rows.numel(), 1, dtype=torch.bool, device=rows.device))
    return rows.numel()
