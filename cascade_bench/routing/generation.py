"""Early-exit generation with one KV cache per stage (DESIGN.md section 1, Generation).

Each stage's cache holds exactly the tokens that reached that stage, which is the context the
compaction rule gives in teacher forcing: stage k attends, causally, over the tokens of its
sequence that reached it, at compact positions 0..n-1 (or their original positions). The
prompt is prefilled with the same routing as teacher forcing; then every new token runs through
stage 0 and onwards until it exits, and the next token comes from the logits of its exit stage.
Sequences in a batch exit at different stages at every step: each stage runs only the rows whose
token reached it (a gather per step), with ragged cache lengths kept as a validity mask.
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
from ..stages.stage_cache import StageCache
from .compaction import plan_layouts, to_dense
from .passes import resolve_thresholds


@dataclass
class GenerationOutput:
    """tokens: (B, N) generated ids (``pad_token_id`` after a sequence's EOS); nll: (B, N) float32
    negative log-likelihood of each generated token under the distribution it was drawn from (its
    exit stage's); exit_stage: (B, N) stage whose logits produced each token; cache_lengths: per
    stage, (B,) tokens held in that stage's cache; plus the cost of the decode phase: exit_counts
    per stage and layer_cost over the ``decode_tokens`` fed back after the prompt, and
    seconds_per_token = wall time of the decode loop (after prefill; CUDA synchronised at both
    ends) / tokens generated, all rows together (its inverse is the decode throughput)."""

    tokens: Tensor
    nll: Tensor
    exit_stage: Tensor
    cache_lengths: tuple
    exit_counts: tuple
    layer_cost: float
    seconds_per_token: float
    decode_tokens: int
    counted_flops: Optional[int] = None


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
          generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Next token per row and its NLL under the distribution it was drawn from (float32)."""
    logits = logits.float()
    if do_sample:
        logits = logits / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -math.inf)
        log_p = logits.log_softmax(-1)
        token = torch.multinomial(log_p.exp(), 1, generator=generator).squeeze(1)
    else:
        log_p = logits.log_softmax(-1)
        token = logits.argmax(-1)
    return token, -log_p.gather(1, token[:, None]).squeeze(1)


def generate(ensemble: Ensemble, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
             max_new_tokens: int = 20, *, method: str = "routed", thresholds: Optional[Sequence[float]] = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: Optional[int] = None, pad_token_id: int = 0, positions: str = "compact",
             generator: Optional[torch.Generator] = None, count_flops: bool = False) -> GenerationOutput:
    """Generate ``max_new_tokens`` per sequence with true early exit (``method="routed"``) or at full
    depth (``method="full"``: every token through every stage, one ``lm_head`` at the end).

    input_ids, attention_mask: (B, P) prompts, left or right padded. Greedy by default; sampling
    with temperature, top-k and top-p. A sequence stops after ``eos_token_id``. ``count_flops``
    runs the whole call under FlopCounterMode (its time per token then includes counting).
    """
    if method not in ("routed", "full"):
        raise ValueError(f"method must be 'routed' or 'full', got {method!r}")
    if positions not in ("compact", "original"):
        raise ValueError(f"positions must be 'compact' or 'original', got {positions!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    ensemble.validate()
    levels = resolve_thresholds(ensemble, thresholds, len(ensemble))
    if method == "full":
        levels = tuple(math.inf for _ in levels)
    if count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
            out = _generate(ensemble, input_ids, attention_mask, max_new_tokens, method, levels, do_sample,
                            temperature, top_k, top_p, eos_token_id, pad_token_id, positions, generator)
        out.counted_flops = int(counter.get_total_flops())
        return out
    return _generate(ensemble, input_ids, attention_mask, max_new_tokens, method, levels, do_sample, temperature,
                     top_k, top_p, eos_token_id, pad_token_id, positions, generator)


def _generate(ensemble, input_ids, attention_mask, max_new_tokens, method, levels, do_sample, temperature, top_k,
              top_p, eos_token_id, pad_token_id, positions, generator) -> GenerationOutput:
    device = ensemble.device
    input_ids = input_ids.to(device)
    batch, prompt_len = input_ids.shape
    real = (attention_mask.to(device).bool() if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool))
    if not bool(real.any(dim=1).all()):
        raise ValueError("every prompt needs at least one real token (attention_mask row of zeros)")
    stages = list(ensemble.stages)
    caches = [StageCache(batch, stage.num_layers, device) for stage in stages]
    original = torch.cumsum(real.long(), dim=1) - 1  # position of each prompt token among real ones
    with evaluation_mode(ensemble), torch.inference_mode():
        logits, produced_by = _prefill(stages, caches, input_ids, real, original, levels, positions)
        tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        nll = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
        exit_stage = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
        every_row = torch.arange(batch, device=device)
        rows, alive, all_alive = every_row, torch.ones(batch, dtype=torch.bool, device=device), True
        reached = [0] * len(stages)
        fed = 0
        length = real.sum(dim=1)  # tokens so far per row (original positions)
        synchronize(device)
        start = time.perf_counter()
        for step in range(max_new_tokens):
            token, token_nll = _pick(logits, do_sample, temperature, top_k, top_p, generator)
            if all_alive:
                tokens[:, step], nll[:, step], exit_stage[:, step] = token, token_nll, produced_by
            else:
                tokens[alive, step] = token[alive]
                nll[alive, step] = token_nll[alive]
                exit_stage[alive, step] = produced_by[alive]
            if eos_token_id is not None:
                alive = alive & (token != eos_token_id)
                still = int(alive.sum())
                if still == 0:
                    break
                all_alive = still == batch
                rows = every_row if all_alive else alive.nonzero().squeeze(1)
            if step == max_new_tokens - 1:
                break
            logits, produced_by, counts = _decode_step(stages, caches, token, rows, length, levels, positions)
            if all_alive:
                length += 1
            else:
                length[rows] += 1
            fed += rows.numel()
            reached = [a + b for a, b in zip(reached, counts)]
        synchronize(device)
        elapsed = time.perf_counter() - start
    layers = [s.num_layers for s in stages]
    exits = [reached[k] - (reached[k + 1] if k + 1 < len(stages) else 0) for k in range(len(stages))]
    generated = int((exit_stage >= 0).sum())
    return GenerationOutput(
        tokens=tokens, nll=nll, exit_stage=exit_stage, cache_lengths=tuple(c.count.clone() for c in caches),
        exit_counts=tuple(exits), layer_cost=(sum(n * l for n, l in zip(reached, layers)) / (fed * sum(layers))
                                              if fed else math.nan),
        seconds_per_token=elapsed / max(generated, 1), decode_tokens=fed)


def _stage_call(stage, cache: StageCache, rows: Tensor, new_valid: Tensor, position_ids: Tensor,
                capture: bool, input_ids: Optional[Tensor] = None,
                inputs_embeds: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Run ``stage`` for ``rows`` on new slots (len(rows), S) over its cached context, writing their
    keys/values into the cache; return the hidden states (and the last layer's input when ``capture``)."""
    past = cache.begin(rows, new_valid.shape[1])
    out = stage(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=cache.attention_mask(new_valid),
                position_ids=position_ids, past_key_values=past, use_cache=True, capture_input_state=capture)
    cache.commit(new_valid)
    return out.hidden, out.input_state


def _decide(stage, hidden: Tensor, input_state: Optional[Tensor], threshold: float) -> tuple[Tensor, Optional[Tensor]]:
    """Exit mask (n,) for one token per row at a non-last stage, and every row's logits (n, V) when
    the rule needed them to decide (None otherwise: the head then runs for exiting rows only)."""
    fn = stage.exit_function
    logits = stage.logits(hidden) if fn.needs_logits else None
    return fn(input_state, hidden, logits.float() if logits is not None else None) >= threshold, logits


def _prefill(stages, caches, input_ids, real, original, levels, positions) -> tuple[Tensor, Tensor]:
    """Route the prompts as teacher forcing does, filling each stage's cache with the tokens that
    reach it; return the logits of each row's last prompt token at its exit stage and that stage."""
    batch, prompt_len = input_ids.shape
    flat_real = real.reshape(-1).nonzero().squeeze(1)
    last_flat = (torch.arange(batch, device=real.device) * prompt_len
                 + (prompt_len - 1 - real.flip(1).int().argmax(dim=1)))  # index of each row's last real token
    out_logits = None
    out_stage = torch.full((batch,), -1, dtype=torch.long, device=real.device)
    reach, state = flat_real, None
    for k, stage in enumerate(stages):
        if reach.numel() == 0:
            break
        (layout,) = plan_layouts(reach, prompt_len, batch, "padded")
        rows = torch.div(reach, prompt_len, rounding_mode="floor").unique()
        dense_valid = to_dense(torch.ones_like(reach, dtype=torch.bool), layout, fill=False)
        if positions == "compact":
            position_ids = torch.arange(layout.length, device=reach.device).expand(layout.num_rows, -1)
        else:
            position_ids = to_dense(original.reshape(-1)[reach], layout, fill=0)
        kwargs = ({"input_ids": to_dense(input_ids.reshape(-1)[reach], layout)} if k == 0
                  else {"inputs_embeds": to_dense(state, layout)})
        last = k == len(stages) - 1
        capture = not last and levels[k] != math.inf and stage.exit_function.needs_input_state
        hidden, input_state = _stage_call(stage, caches[k], rows, dense_valid, position_ids, capture, **kwargs)
        hidden = hidden[layout.rows, layout.cols]
        input_state = input_state[layout.rows, layout.cols] if capture else None
        if last or levels[k] == math.inf:
            exits = torch.full((reach.numel(),), last, dtype=torch.bool, device=reach.device)
        else:
            exits, _ = _decide(stage, hidden, input_state, levels[k])
        is_last = (reach[:, None] == last_flat[None]).any(dim=1)
        leaving_last = exits & is_last
        if bool(leaving_last.any()):
            logits = stage.logits(hidden[leaving_last])
            if out_logits is None:
                out_logits = logits.new_zeros(batch, logits.shape[-1])
            seq = torch.div(reach[leaving_last], prompt_len, rounding_mode="floor")
            out_logits[seq] = logits
            out_stage[seq] = k
        reach, state = reach[~exits], hidden[~exits]
    return out_logits, out_stage


def _decode_step(stages, caches, token: Tensor, rows: Tensor, length: Tensor, levels,
                 positions) -> tuple[Tensor, Tensor, list[int]]:
    """Feed one new token for each row in ``rows``; return next-token logits (B, V) and the stage
    that produced them (B,) (zeros and -1 for rows not in ``rows``), and how many rows reached each
    stage. A stage where every row or no row exits costs no gather: one host sync per stage to
    learn how many exit, index copies only when the rows split."""
    batch = token.shape[0]
    counts = [0] * len(stages)
    exited: list[tuple[Tensor, Tensor, int]] = []  # (rows, their logits, stage)
    state = None
    active = rows
    for k, stage in enumerate(stages):
        n = active.numel()
        counts[k] = n
        whole = n == batch
        cache = caches[k]
        position = ((cache.count if whole else cache.count[active]) if positions == "compact"
                    else (length if whole else length[active]))
        new_valid = torch.ones(n, 1, dtype=torch.bool, device=active.device)
        kwargs = ({"input_ids": (token if whole else token[active])[:, None]} if k == 0
                  else {"inputs_embeds": state[:, None]})
        last = k == len(stages) - 1
        capture = not last and levels[k] != math.inf and stage.exit_function.needs_input_state
        hidden, input_state = _stage_call(stage, cache, active, new_valid, position[:, None], capture, **kwargs)
        hidden = hidden[:, 0]
        if last:
            exited.append((active, stage.logits(hidden), k))
            break
        if levels[k] == math.inf:  # nobody exits here: no head at all (the full-depth path)
            state = hidden
            continue
        exits, stage_logits = _decide(stage, hidden, input_state[:, 0] if capture else None, levels[k])
        leaving = int(exits.sum())
        if leaving == 0:
            state = hidden
            continue
        if leaving == n:
            exited.append((active, stage_logits if stage_logits is not None else stage.logits(hidden), k))
            break
        out, stay = exits.nonzero().squeeze(1), (~exits).nonzero().squeeze(1)
        exited.append((active[out], stage_logits[out] if stage_logits is not None else stage.logits(hidden[out]), k))
        active, state = active[stay], hidden[stay]
    if len(exited) == 1 and exited[0][0].numel() == batch:  # every row exited at one stage
        _, logits, k = exited[0]
        return logits, torch.full((batch,), k, dtype=torch.long, device=logits.device), counts
    logits = exited[0][1].new_zeros(batch, exited[0][1].shape[-1])
    produced_by = torch.full((batch,), -1, dtype=torch.long, device=logits.device)
    for where, stage_logits, k in exited:
        logits[where] = stage_logits
        produced_by[where] = k
    return logits, produced_by, counts
