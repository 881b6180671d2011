"""Routed early exit over a whole (B, T) batch that fills one KV cache per stage, under a K/V policy.

The K/V policy says what a later stage's cache holds for a token that exited before it
(``KV_POLICIES``):

- ``"absent"``: nothing. Stage k attends over the tokens that reached it (the compaction rule).
- ``"propagate"`` (CALM): the exited token's state fills every later stage's cache: each layer's
  keys/values computed from that state (``stages.key_values``), charged as K/V projections for
  every exited token and every later layer. Stage k's tokens attend, at their original positions,
  over every earlier token, reached or propagated.
- ``"recompute"`` (EE-LLM): a later stage runs on the tokens that exited before it once a later
  token of the same sequence reaches it, batched with that token. In a whole-batch pass that
  makes stage k run on each sequence's prefix up to its last token that reaches stage k; the
  tokens after it stay pending (their states wait in ``Pending``) until generation feeds one
  that reaches the stage. Recomputed tokens cost what any token costs at that stage.

Under ``propagate`` and ``recompute`` every earlier token holds a slot in every stage a token
attends in, so positions are original ones. This pass is the prompt prefill of generation and
the teacher-forced routed pass of the two non-absent policies; ``absent`` teacher forcing keeps
the faster ``passes`` pass (bucketing), and generation uses this one for its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from ..measure.probes import NO_PROBE, Probe
from ..stages.key_values import propagated_key_values
from ..stages.stage_cache import StageCache
from .compaction import plan_layouts, rank_in_sequence, to_dense
from .policy_names import KV_POLICIES


def check_kv_policy(kv_policy) -> str:
    if kv_policy not in KV_POLICIES:
        raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {kv_policy!r}")
    return kv_policy


class Pending:
    """Under ``recompute``: per row, the tokens waiting to enter one stage (their input states and
    original positions, in sequence order), until a token of that row reaches the stage."""

    def __init__(self, batch_size: int, hidden_size: int, device, dtype):
        self.states = torch.zeros(batch_size, 0, hidden_size, device=device, dtype=dtype)
        self.positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)

    def _put(self, seq: Tensor, rank: Tensor, added: Tensor, states: Tensor, positions: Tensor) -> None:
        """Append tokens of rows ``seq`` (N,) at their ``rank`` among the row's ``added`` (B,) new ones."""
        if seq.numel() == 0:
            return
        need = int((self.count + added).max())
        if need > self.states.shape[1]:
            capacity = max(need, 2 * self.states.shape[1], 16)
            grown = self.states.new_zeros(self.states.shape[0], capacity, self.states.shape[2])
            grown[:, : self.states.shape[1]] = self.states
            grown_pos = self.positions.new_zeros(self.positions.shape[0], capacity)
            grown_pos[:, : self.positions.shape[1]] = self.positions
            self.states, self.positions = grown, grown_pos
        slot = self.count[seq] + rank
        self.states[seq, slot] = states.to(self.states.dtype)
        self.positions[seq, slot] = positions
        self.count += added

    def push_flat(self, flat_index: Tensor, states: Tensor, positions: Tensor, seq_len: int) -> None:
        """Append tokens given by sorted flat indices into a (B, seq_len) grid."""
        seq, rank, counts = rank_in_sequence(flat_index, seq_len, self.count.numel())
        self._put(seq, rank, counts, states, positions)

    def push(self, rows: Tensor, states: Tensor, positions: Tensor, valid: Tensor) -> None:
        """Append the real slots of dense (len(rows), S) states/positions, row by row in order."""
        rank = (valid.long().cumsum(1) - 1)[valid]
        seq = rows[:, None].expand_as(valid)[valid]
        added = torch.zeros_like(self.count).index_add_(0, rows, valid.long().sum(1))
        self._put(seq, rank, added, states[valid], positions[valid])

    def take(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Remove and return the pending tokens of ``rows``: states (n, P, d), positions (n, P) and
        validity (n, P), left-aligned (P = the longest)."""
        counts = self.count[rows]
        width = int(counts.max()) if rows.numel() else 0
        states, positions = self.states[rows, :width], self.positions[rows, :width]
        valid = torch.arange(width, device=counts.device)[None] < counts[:, None]
        self.count[rows] = 0
        return states, positions, valid


def stage_call(
    stage,
    cache: StageCache,
    rows: Tensor,
    new_valid: Tensor,
    position_ids: Tensor,
    capture: bool,
    input_ids: Optional[Tensor] = None,
    inputs_embeds: Optional[Tensor] = None,
    attention_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Run ``stage`` for ``rows`` on new slots (len(rows), S) over its cached context, writing their
    keys/values into the cache; return the hidden states (and the last layer's input when
    ``capture``). ``attention_mask``: a 4-D mask replacing the cache's own (K/V propagation)."""
    past = cache.begin(rows, new_valid.shape[1])
    mask = cache.attention_mask(new_valid, stage.dtype) if attention_mask is None else attention_mask
    out = stage(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        position_ids=position_ids,
        cache=past,
        use_cache=True,
        capture_input_state=capture,
    )
    cache.commit(new_valid)
    return out.hidden, out.input_state


def _position_mask(key_positions: Tensor, key_valid: Tensor, query_positions: Tensor, dtype) -> Tensor:
    """(R, 1, L, K) additive mask: query i sees key j iff j is real and no later than i."""
    allowed = key_valid[:, None, :] & (key_positions[:, None, :] <= query_positions[:, :, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@dataclass
class CachedPassCounts:
    """Per stage: tokens decided there (reached it), tokens its layers ran on (reached + recomputed),
    tokens whose K/V were propagated into it, and the (rows, queries, keys) of its dense batches."""

    entered: list = field(default_factory=list)
    computed: list = field(default_factory=list)
    propagated: list = field(default_factory=list)
    shapes: list = field(default_factory=list)

    def add(self, entered: int, computed: int, propagated: int, shapes: tuple) -> None:
        """One more stage's counts."""
        self.entered.append(entered)
        self.computed.append(computed)
        self.propagated.append(propagated)
        self.shapes.append(shapes)


#: decide(k, flat_index, hidden, input_state, last) -> bool exit mask; at the last stage all True.
Decide = Callable[[int, Tensor, Tensor, Optional[Tensor], bool], Tensor]


def cached_pass(
    stages,
    caches: list[StageCache],
    input_ids: Tensor,
    real: Tensor,
    kv_policy: str,
    positions: str,
    capture: list[bool],
    decide: Decide,
    pending: Optional[list[Optional[Pending]]] = None,
    probe: Probe = NO_PROBE,
) -> CachedPassCounts:
    """Route every real token of ``input_ids`` (B, T) (``real``: (B, T) bool) through ``stages``, filling
    the empty ``caches`` under ``kv_policy`` (module doc). ``decide`` is asked at every stage for the
    tokens that reached it (``capture[k]``: with stage k's last-layer input). ``pending``: under
    ``recompute``, per stage (None for stage 0), receives the tokens left waiting to enter it."""
    batch, seq_len = input_ids.shape
    flat_real = real.reshape(-1).nonzero().squeeze(1)
    original = (torch.cumsum(real.long(), dim=1) - 1).reshape(-1)
    live, live_state = flat_real, None  # tokens that reached the current stage, and their input states
    run, run_state = flat_real, None  # tokens its layers run on (recompute: each row's prefix)
    exited, exited_state = flat_real[:0], None  # propagate: tokens that exited so far, their exit states
    counts = CachedPassCounts()
    for k, stage in enumerate(stages):
        last, cache = k == len(stages) - 1, caches[k]
        with probe.span(f"stage{k}"):
            propagated, key_block = 0, None
            if kv_policy == "propagate" and exited.numel():
                with probe.span(f"stage{k}.layers"):
                    key_block = _propagate_block(stage, cache, exited, exited_state, original, seq_len, batch)
                propagated = exited.numel()
            tokens, states = (run, run_state) if kv_policy == "recompute" else (live, live_state)
            if tokens.numel() == 0:
                counts.add(0, 0, propagated, ())
                continue
            with probe.span(f"stage{k}.gather"):
                layout, rows, new_valid, position_ids, mask, keys, inputs = _gathered(
                    stage, k, tokens, states, input_ids, original, key_block, positions, kv_policy
                )
            with probe.span(f"stage{k}.layers"):
                hidden, input_state = stage_call(
                    stage, cache, rows, new_valid, position_ids, capture[k], attention_mask=mask, **inputs
                )
            hidden = hidden[layout.rows, layout.cols]
            input_state = input_state[layout.rows, layout.cols] if capture[k] else None
            shape = (layout.num_rows, layout.length) + ((keys,) if keys != layout.length else ())
            live_hidden, live_input = (
                _at(tokens, live, hidden, input_state) if kv_policy == "recompute" else (hidden, input_state)
            )
            exits = decide(k, live, live_hidden, live_input, last)
            counts.add(live.numel(), tokens.numel(), propagated, (shape,))
            if kv_policy == "propagate" and not last and bool(exits.any()):
                exited, exited_state = _with_exits(exited, exited_state, live[exits], live_hidden[exits])
            live, live_state = live[~exits], live_hidden[~exits]
            if kv_policy == "recompute" and not last:
                keep = _recomputed_prefix(tokens, live, original, batch, seq_len)
                if pending is not None and pending[k + 1] is not None:
                    pending[k + 1].push_flat(tokens[~keep], hidden[~keep], original[tokens[~keep]], seq_len)
                run, run_state = tokens[keep], hidden[keep]
    return counts


def _at(tokens: Tensor, live: Tensor, hidden: Tensor, input_state: Optional[Tensor]) -> tuple:
    """The rows of ``hidden`` (and ``input_state``) of the ``live`` tokens among the sorted ``tokens``
    a stage ran on (under ``recompute`` it also ran on their prefixes)."""
    at = torch.searchsorted(tokens, live)
    return hidden[at], input_state[at] if input_state is not None else None


def _with_exits(exited: Tensor, exited_state: Optional[Tensor], new: Tensor, new_state: Tensor) -> tuple:
    """The tokens that exited so far and their exit states, with ``new`` ones added, kept sorted."""
    exited, order = torch.cat([exited, new]).sort()
    joined = new_state if exited_state is None else torch.cat([exited_state, new_state])
    return exited, joined[order]


def _gathered(
    stage, k: int, tokens: Tensor, states, input_ids: Tensor, original: Tensor, key_block, positions, kv_policy
):
    """Stage ``k``'s padded input from the flat ``tokens`` it runs on: (layout, the batch rows they sit
    in, which slots are new, position ids, the attention mask over the propagated keys and the new
    ones (None without propagated keys), the key count, and its inputs: token ids at stage 0, else
    the input states)."""
    batch, seq_len = input_ids.shape
    (layout,) = plan_layouts(tokens, seq_len, batch, "padded")
    rows = torch.div(tokens, seq_len, rounding_mode="floor").unique()
    new_valid = to_dense(torch.ones_like(tokens, dtype=torch.bool), layout, fill=False)
    if positions == "compact" and kv_policy == "absent":
        position_ids = torch.arange(layout.length, device=input_ids.device).expand(layout.num_rows, -1)
    else:
        position_ids = to_dense(original[tokens], layout, fill=0)
    inputs = (
        {"input_ids": to_dense(input_ids.reshape(-1)[tokens], layout)}
        if k == 0
        else {"inputs_embeds": to_dense(states, layout)}
    )
    mask, keys = None, layout.length
    if key_block is not None:
        key_positions, key_valid = key_block
        mask = _position_mask(
            torch.cat([key_positions[rows], position_ids], dim=1),
            torch.cat([key_valid[rows], new_valid], dim=1),
            position_ids,
            stage.dtype,
        )
        keys += key_positions.shape[1]
    return layout, rows, new_valid, position_ids, mask, keys, inputs


def _recomputed_prefix(tokens: Tensor, live: Tensor, original: Tensor, batch: int, seq_len: int) -> Tensor:
    """Under ``recompute``, which of the ``tokens`` a stage ran on the next stage runs again: in each
    row, those up to the last token still live there (the prefix its keys and values need)."""
    last_position = torch.full((batch,), -1, dtype=torch.long, device=tokens.device)
    live_rows = torch.div(live, seq_len, rounding_mode="floor")
    last_position.scatter_reduce_(0, live_rows, original[live], reduce="amax")
    return original[tokens] <= last_position[torch.div(tokens, seq_len, rounding_mode="floor")]


def _propagate_block(
    stage, cache: StageCache, exited: Tensor, exited_state: Tensor, original: Tensor, seq_len: int, batch: int
) -> tuple[Tensor, Tensor]:
    """Write the propagated K/V of every exited token into ``cache`` as a block of slots (left-aligned
    per row, for all B rows); return the block's (B, M) original positions and validity."""
    (layout,) = plan_layouts(exited, seq_len, batch, "padded")
    rows = torch.div(exited, seq_len, rounding_mode="floor").unique()
    dense_positions = to_dense(original[exited], layout, fill=0)
    dense_valid = to_dense(torch.ones_like(exited, dtype=torch.bool), layout, fill=False)
    flat = propagated_key_values(stage, exited_state[:, None], original[exited][:, None])  # real tokens only
    key_values = [tuple(to_dense(t[:, :, 0], layout).transpose(1, 2) for t in pair) for pair in flat]
    cache.append(rows, key_values, dense_valid)
    width = layout.length
    positions = torch.zeros(batch, width, dtype=torch.long, device=exited.device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=exited.device)
    positions[rows], valid[rows] = dense_positions, dense_valid
    return positions, valid
