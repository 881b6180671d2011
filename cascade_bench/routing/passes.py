"""Teacher-forced forward passes over an Ensemble: routed early exit and its baselines.

Methods (``METHODS``), one API:

- ``"routed"``: true early exit. After stage k every token that reached it is decided on;
  the continuing tokens of each sequence are gathered (original order, compact positions by
  default) into a smaller batch for stage k+1; exited tokens never touch a later stage.
- ``"masked"``: the naive implementation. Every stage computes every token (full causal
  context) and its exit head; each token takes the result of the first stage whose confidence
  clears the threshold. Same cost as running everything, plus heads.
- ``"full"``: no early exit. Stages chained on every token, ``lm_head`` only after the last of
  the first ``num_stages`` stages (the full cascade, or a stage prefix alone).

Attention inside a stage batch: continuing tokens are left-aligned in their row and padding
only ever follows them, so a plain causal mask already keeps every real token from seeing a
padding slot. The stage therefore gets an all-ones 2-D mask, which lets SDPA use its causal
kernel; what padding slots compute is discarded and counted as waste.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..data.batch import TokenBatch, make_token_batch
from ..measure.probes import NO_PROBE, Probe
from ..stages.ensemble import Ensemble
from ..stages.llm import check_threshold
from ..stages.stage import Stage
from ..stages.stage_cache import StageCache
from .cached_pass import cached_pass, check_kv_policy
from .compaction import Layout, from_dense, plan_layouts, scatter_members, to_dense
from .exit_head import HeadResult, run_exit_head
from .stage_reuse import BatchReuse

METHODS = ("routed", "masked", "full")
POSITION_MODES = ("compact", "original")


@dataclass
class RoutedOutput:
    """Per-token and per-stage results of one forward pass over a (B, T) batch.

    nll: (B, T) float32 NLL of each token's target at its exit stage, 0 where not scored.
    correct: (B, T) bool, argmax at the exit stage == target.
    exit_stage: (B, T) int64, the stage each token exited at, -1 for padding.
    scored: (B, T) bool, token is real and has a target.
    stage_nll: (S, B, T) float32, NLL at stage k for tokens whose stage-k head was computed, else NaN.
    stage_confidence: (S, B, T) float32, exit confidence at stage k where computed, else NaN.
    stage_prediction: (S, B, T) int64, argmax at stage k for tokens whose stage-k head was computed, else -1.
    tokens_entered / tokens_exited: per stage, real tokens that reached / left the stage.
    slots_computed: per stage, dense slots the stage computed (tokens + padding).
    stage_batch_shapes: per stage, the (rows, length) of every dense batch the stage ran.
    head_tokens: per stage, tokens whose logits the stage's exit head computed.
    decided_tokens: per stage, tokens the stage's exit rule computed a confidence for.
    continuing_index, continuing_state: with ``open_end=True``, the flat indices (N,) and hidden
        states (N, d) of the tokens that continue past the last stage run (exit_stage = S for them).
    logits: (B, T, V) logits at each token's exit stage, only if asked for.
    kv_policy: what later stages' caches held for exited tokens (``cached_pass.KV_POLICIES``).
    recomputed_tokens: per stage, tokens that exited earlier and ran through it anyway (``recompute``).
    propagated_tokens: per stage, exited tokens whose keys/values were propagated into its layers.
    """

    method: str
    nll: Tensor
    correct: Tensor
    exit_stage: Tensor
    scored: Tensor
    stage_nll: Tensor
    stage_confidence: Tensor
    stage_prediction: Tensor
    tokens_entered: tuple[int, ...]
    tokens_exited: tuple[int, ...]
    slots_computed: tuple[int, ...]
    layers_per_stage: tuple[int, ...]
    thresholds: tuple[float, ...]
    stage_batch_shapes: tuple[tuple[tuple[int, int], ...], ...] = ()
    head_tokens: tuple[int, ...] = ()
    decided_tokens: tuple[int, ...] = ()
    logits: Optional[Tensor] = None
    continuing_index: Optional[Tensor] = None
    continuing_state: Optional[Tensor] = None
    kv_policy: str = "absent"
    recomputed_tokens: tuple[int, ...] = ()
    propagated_tokens: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        """Real tokens in the batch (all of them enter stage 0)."""
        return self.tokens_entered[0]

    @property
    def exit_ratios(self) -> tuple[float, ...]:
        """Fraction of real tokens that exited at each stage (sums to 1)."""
        return tuple(e / self.num_tokens for e in self.tokens_exited)

    @property
    def tokens_computed(self) -> tuple[int, ...]:
        """Per stage, tokens its layers ran on: those that reached it plus the recomputed ones."""
        if not self.recomputed_tokens:
            return self.tokens_entered
        return tuple(n + r for n, r in zip(self.tokens_entered, self.recomputed_tokens))

    @property
    def layer_cost(self) -> float:
        """docs/design.md section 3: sum_k tokens computed at k x layers_k / (tokens x all layers)."""
        done = sum(n * layers for n, layers in zip(self.tokens_computed, self.layers_per_stage))
        return done / (self.num_tokens * sum(self.layers_per_stage))

    @property
    def padding_waste(self) -> tuple[float, ...]:
        """Per stage, fraction of computed slots that were padding (recomputed tokens are real work,
        not padding)."""
        return tuple((s - n) / s if s else 0.0 for s, n in zip(self.slots_computed, self.tokens_computed))


def resolve_thresholds(ensemble: Ensemble, thresholds: Optional[Sequence[float]], num_stages: int) -> tuple[float, ...]:
    """Thresholds for the first ``num_stages`` stages (the last one's is unused)."""
    if thresholds is None:
        return ensemble.thresholds[:num_stages]
    values = [check_threshold(t) for t in thresholds]
    if len(values) == num_stages - 1:
        values.append(math.inf)
    if len(values) != num_stages:
        raise ValueError(
            f"expected {num_stages - 1} (or {num_stages}) thresholds for {num_stages} stages, "
            f"got {len(values)}: {values}"
        )
    return tuple(values)


def _check_pass_options(method: str, batching: str, positions: str, open_end: bool, kv_policy: str) -> None:
    """ValueError naming a method, position mode or K/V policy that does not exist, or a combination
    the pass does not run (a K/V policy or an open end outside padded routed passes)."""
    check_kv_policy(kv_policy)
    if kv_policy != "absent" and (method != "routed" or batching != "padded" or open_end):
        raise ValueError(
            f"kv_policy={kv_policy!r} needs method='routed', batching='padded' and no open_end; got "
            f"method={method!r}, batching={batching!r}, open_end={open_end!r}"
        )
    if open_end and method != "routed":
        raise ValueError(f"open_end needs method='routed', got {method!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")


# Over 60 lines only for its keyword options and their documentation (the one entry point of every
# pass); the body is 20 lines.
def forward_cascade(
    ensemble: Ensemble,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    targets: Optional[Tensor] = None,
    *,
    method: str = "routed",
    batching: str = "padded",
    positions: str = "compact",
    thresholds: Optional[Sequence[float]] = None,
    num_stages: Optional[int] = None,
    return_logits: bool = False,
    logits_chunk_tokens: Optional[int] = None,
    confidence_at_last_stage: bool = False,
    probe: Probe = NO_PROBE,
    open_end: bool = False,
    kv_policy: str = "absent",
    call_overhead_slots: Optional[int] = None,
    reuse: Optional[BatchReuse] = None,
) -> RoutedOutput:
    """Run ``method`` over the batch. See the module docstring for the methods.

    input_ids, attention_mask, targets: (B, T); targets are already shifted (the token to predict at
    t), by default the next real token. batching: "padded" or "bucketed" (routed only).
    positions: "compact" (0..n-1 over the tokens reaching a stage) or "original".
    thresholds: per stage, overriding the stages' own. num_stages: use only the first stages.
    confidence_at_last_stage: also compute the last stage's exit confidence (for calibration and
    histograms; off by default because nobody needs it to route).
    probe: receives the pass's named spans (see ``probes``); the default does nothing.
    open_end: the last stage run decides like a middle one (routed only) and the continuing tokens'
    states are returned: the input the next stage would get (used to collect hard tokens).
    kv_policy: what a later stage's attention sees of tokens that exited before it (routed only;
    ``cached_pass``): "absent" (the compaction rule), "propagate" or "recompute" (padded batching,
    original positions: every earlier token then holds a slot).
    call_overhead_slots: with bucketed batching, a stage call's fixed cost in slots: length classes
    merge where the padding costs less (``compaction.plan_layouts``; None = ``CALL_OVERHEAD_SLOTS``,
    0 keeps every class apart).
    reuse: this batch's ``stage_reuse.BatchReuse``: stage outputs and exit-head results over every
    real token are read from it or kept in it (the same bits as computing them; untimed, uncounted
    passes only: refused with a probe, logits or a K/V policy).
    """
    _check_pass_options(method, batching, positions, open_end, kv_policy)
    ensemble.validate()
    num_stages = len(ensemble) if num_stages is None else num_stages
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not 1 <= num_stages <= len(ensemble):
        raise ValueError(f"num_stages must be an int in [1, {len(ensemble)}], got {num_stages!r}")
    stages: list[Stage] = list(ensemble.stages)[:num_stages]
    thresholds = resolve_thresholds(ensemble, thresholds, num_stages)
    batch = make_token_batch(input_ids, attention_mask, targets, vocab_size=ensemble.vocab_size, device=ensemble.device)
    _check_lengths(stages, batch, positions)
    if reuse is not None:
        _check_reuse(reuse, probe, return_logits, kv_policy)
        reuse.bind(input_ids=batch.ids, tokens=batch.tokens, targets=batch.targets)
    runner = _Pass(
        stages,
        batch,
        method,
        batching,
        positions,
        thresholds,
        return_logits,
        logits_chunk_tokens,
        confidence_at_last_stage,
        probe,
        open_end,
        call_overhead_slots=call_overhead_slots,
        reuse=reuse,
    )
    return runner.run() if kv_policy == "absent" else runner.run_cached(kv_policy)


def _check_reuse(reuse: BatchReuse, probe: Probe, return_logits: bool, kv_policy: str) -> None:
    """ValueError for a pass that must not reuse: a counted or span-timed one that would read (its
    probe must see every op; it may keep what it computes), one that returns logits (they are not
    kept) or one under a K/V policy."""
    if (probe is not NO_PROBE and reuse.reading) or return_logits or kv_policy != "absent":
        raise ValueError(
            f"reuse is for plain untimed passes: got a probe ({type(probe).__name__}), return_logits="
            f"{return_logits!r}, kv_policy={kv_policy!r} (expected no probe, False, 'absent')"
        )


@dataclass
class StageStates:
    """Per-token states of each stage over the tokens that stage ran on.

    flat_index: (N,) flat positions (b * T + t) of the real tokens (what stage 0 runs on).
    targets: (N,) their next-token targets (negative = not scored).
    hidden: per stage, (N_k, d) output state (what the stage's exit rule and lm_head read), rows in
    the order of ``reach[k]``.
    input_state: per stage, (N_k, d) input of its last decoder layer, or None where not captured.
    reach: per stage, (N_k,) flat positions of the tokens it ran on (all N without exits).
    stage_targets: per stage, (N_k,) their targets.
    """

    flat_index: Tensor
    targets: Tensor
    hidden: list[Tensor]
    input_state: list[Optional[Tensor]]
    reach: list[Tensor] = field(default_factory=list)
    stage_targets: list[Tensor] = field(default_factory=list)


def stage_states(
    ensemble: Ensemble,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    targets: Optional[Tensor] = None,
    *,
    num_stages: Optional[int] = None,
    capture_input_state: bool = False,
    positions: str = "compact",
    routed_thresholds: Optional[Sequence[float]] = None,
    batching: str = "bucketed",
) -> StageStates:
    """Each of the first ``num_stages`` stages' per-token states (for training exit classifiers and
    probes on what a stage sees when routed).

    Without ``routed_thresholds``: every stage on every real token, laid out as the ``full`` pass
    lays them out (which is what the routed pass's stage 0 sees). With them (one per stage, as
    ``forward_cascade(method="routed")`` takes them): the routed pass itself runs, tokens exit
    under the stages' exit rules at those thresholds, and stage k's states are the ones the routed
    pass computes for the tokens that reach it (gathered, compact positions, ``batching``)."""
    num_stages = len(ensemble) if num_stages is None else num_stages
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not 1 <= num_stages <= len(ensemble):
        raise ValueError(f"num_stages must be an int in [1, {len(ensemble)}], got {num_stages!r}")
    ensemble.validate()
    stages = list(ensemble.stages)[:num_stages]
    batch = make_token_batch(input_ids, attention_mask, targets, vocab_size=ensemble.vocab_size, device=ensemble.device)
    _check_lengths(stages, batch, positions)
    if routed_thresholds is not None:
        thresholds = resolve_thresholds(ensemble, routed_thresholds, num_stages)
        runner = _Pass(
            stages, batch, "routed", batching, positions, thresholds, False, None, False, kept=capture_input_state
        )
        runner.run()
        reach, hidden, inputs = (list(column) for column in zip(*runner.states))
    else:
        runner = _Pass(stages, batch, "full", "padded", positions, (math.inf,) * num_stages, False, None, False)
        layouts = plan_layouts(batch.tokens, batch.seq_len, batch.batch_size, "padded")
        state, hidden, inputs = None, [], []
        for k, stage in enumerate(stages):
            state, captured = runner._run_stage(stage, k, batch.tokens, state, layouts, capture_input_state)
            hidden.append(state)
            inputs.append(captured)
        reach = [batch.tokens] * num_stages
    return StageStates(
        flat_index=batch.tokens,
        targets=batch.targets[batch.tokens],
        hidden=hidden,
        input_state=inputs,
        reach=reach,
        stage_targets=[batch.targets[r] for r in reach],
    )


def _check_lengths(stages: list[Stage], batch: TokenBatch, positions: str) -> None:
    # Compact positions never exceed T-1; original positions are at most T-1 too.
    for k, stage in enumerate(stages):
        if stage.max_positions is not None and batch.seq_len > stage.max_positions:
            raise ValueError(
                f"sequence length {batch.seq_len} exceeds stage {k}'s max_position_embeddings "
                f"{stage.max_positions}; use shorter windows"
            )


@dataclass
class _Pass:
    """One forward pass; holds the per-token result buffers while stages run."""

    stages: list[Stage]
    batch: TokenBatch
    method: str
    batching: str
    positions: str
    thresholds: tuple[float, ...]
    return_logits: bool
    chunk_tokens: Optional[int]
    last_confidence: bool
    probe: Probe = NO_PROBE
    open_end: bool = False
    #: None: keep nothing; False/True: keep each stage's (reach, hidden, input state or None) in
    #: ``states``, capturing the input state when True (``stage_states``)
    kept: Optional[bool] = None
    call_overhead_slots: Optional[int] = None
    reuse: Optional[BatchReuse] = None
    states: list[tuple] = field(default_factory=list)
    entered: list[int] = field(default_factory=list)
    exited: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    shapes: list[tuple[tuple[int, int], ...]] = field(default_factory=list)
    head_tokens: list[int] = field(default_factory=list)
    decided: list[int] = field(default_factory=list)

    def _start(self) -> None:
        """Allocate the per-token result buffers."""
        batch, num_stages = self.batch, len(self.stages)
        flat = batch.batch_size * batch.seq_len
        device = batch.ids.device
        self.nll = torch.zeros(flat, dtype=torch.float32, device=device)
        self.correct = torch.zeros(flat, dtype=torch.bool, device=device)
        self.exit_stage = torch.full((flat,), -1, dtype=torch.long, device=device)
        self.stage_nll = torch.full((num_stages, flat), math.nan, dtype=torch.float32, device=device)
        self.stage_conf = torch.full((num_stages, flat), math.nan, dtype=torch.float32, device=device)
        self.stage_pred = torch.full((num_stages, flat), -1, dtype=torch.long, device=device)
        self.logits = (
            torch.zeros(flat, self.stages[0].vocab_size, dtype=self.stages[0].dtype, device=device)
            if self.return_logits
            else None
        )

    def run(self) -> RoutedOutput:
        self._start()
        batch, num_stages = self.batch, len(self.stages)
        device = batch.ids.device
        reach = batch.tokens  # flat indices of the tokens entering the current stage
        state: Optional[Tensor] = None  # (len(reach), d) hidden states handed to the current stage
        self.alive = torch.ones(reach.numel(), dtype=torch.bool, device=device)  # masked method only
        layouts: Optional[list[Layout]] = None
        for k, stage in enumerate(self.stages):
            if reach.numel() == 0:  # everyone exited earlier: this stage does no work at all
                for counts in (self.entered, self.exited, self.slots, self.head_tokens, self.decided):
                    counts.append(0)
                if self.kept is not None:
                    self.states.append((reach, torch.empty(0, stage.hidden_size, device=device), None))
                self.shapes.append(())
                continue
            with self.probe.span(f"stage{k}"):
                if layouts is None or self.method == "routed":
                    with self.probe.span(f"stage{k}.gather"):
                        layouts = plan_layouts(
                            reach,
                            batch.seq_len,
                            batch.batch_size,
                            self.batching if self.method == "routed" else "padded",
                            call_overhead_slots=self.call_overhead_slots,
                        )
                last = k == num_stages - 1 and not self.open_end
                decides = (not last or self.last_confidence) and self.method != "full"
                capture = (decides and stage.exit_rule.needs_input_state) or bool(self.kept)
                hidden, input_state = self._stage_output(stage, k, reach, state, layouts, capture)
                if self.kept is not None:
                    self.states.append((reach, hidden, input_state if self.kept else None))
                self.entered.append(reach.numel())
                self.slots.append(sum(layout.slots for layout in layouts))
                self.shapes.append(tuple((layout.num_rows, layout.length) for layout in layouts))
                reach, state = self._decide(stage, k, last, reach, hidden, input_state)
        continuing = None
        if self.open_end:
            self._open_end(reach)
            continuing = (reach, state if state is not None else torch.empty(0, self.stages[-1].hidden_size))
        return self._output(continuing)

    def run_cached(self, kv_policy: str) -> RoutedOutput:
        """The routed pass under a K/V policy other than ``absent`` (``cached_pass``), scored as ``run``."""
        self._start()
        batch, num_stages = self.batch, len(self.stages)
        caches = [StageCache(batch.batch_size, stage.num_layers, batch.ids.device) for stage in self.stages]
        capture = [
            (k < num_stages - 1 or self.last_confidence) and stage.exit_rule.needs_input_state
            for k, stage in enumerate(self.stages)
        ]
        real = torch.zeros(batch.batch_size * batch.seq_len, dtype=torch.bool, device=batch.ids.device)
        real[batch.tokens] = True

        def decide(k: int, reach: Tensor, hidden: Tensor, input_state: Optional[Tensor], last: bool) -> Tensor:
            self.head_tokens.append(0)
            self.decided.append(reach.numel() if not last or self.last_confidence else 0)
            return self._route(self.stages[k], k, last, reach, hidden, input_state, self.batch.targets[reach])

        shape = (batch.batch_size, batch.seq_len)
        counts = cached_pass(
            self.stages,
            caches,
            batch.ids.view(shape),
            real.view(shape),
            kv_policy,
            self.positions,
            capture,
            decide,
            probe=self.probe,
        )
        ran = len(self.exited)
        for tally in (self.exited, self.head_tokens, self.decided):
            tally.extend([0] * (num_stages - ran))
        self.entered = list(counts.entered)
        self.shapes = list(counts.shapes)
        self.slots = [sum(shape[0] * shape[1] for shape in shapes) for shapes in counts.shapes]
        out = self._output(None)
        out.kv_policy = kv_policy
        out.recomputed_tokens = tuple(c - n for c, n in zip(counts.computed, counts.entered))
        out.propagated_tokens = tuple(counts.propagated)
        return out

    def _output(self, continuing) -> RoutedOutput:
        batch, num_stages = self.batch, len(self.stages)
        return RoutedOutput(
            method=self.method,
            nll=self.nll.view(batch.batch_size, batch.seq_len),
            correct=self.correct.view(batch.batch_size, batch.seq_len),
            exit_stage=self.exit_stage.view(batch.batch_size, batch.seq_len),
            scored=self._scored().view(batch.batch_size, batch.seq_len),
            stage_nll=self.stage_nll.view(num_stages, batch.batch_size, batch.seq_len),
            stage_confidence=self.stage_conf.view(num_stages, batch.batch_size, batch.seq_len),
            stage_prediction=self.stage_pred.view(num_stages, batch.batch_size, batch.seq_len),
            tokens_entered=tuple(self.entered),
            tokens_exited=tuple(self.exited),
            slots_computed=tuple(self.slots),
            layers_per_stage=tuple(s.num_layers for s in self.stages),
            thresholds=self.thresholds,
            stage_batch_shapes=tuple(self.shapes),
            head_tokens=tuple(self.head_tokens),
            decided_tokens=tuple(self.decided),
            logits=None if self.logits is None else self.logits.view(batch.batch_size, batch.seq_len, -1),
            continuing_index=None if continuing is None else continuing[0],
            continuing_state=None if continuing is None else continuing[1],
        )

    def _whole_key(self, k: int, reach: Tensor) -> Optional[tuple]:
        """The reuse key of stage k's work when every real token reaches it (None: no reuse, or a
        subset reaches it, whose states depend on which tokens continue)."""
        if self.reuse is None or reach.numel() != self.batch.tokens.numel():
            return None
        layout = self.batching if self.method == "routed" else "padded"
        return (k, layout, self.positions, self.call_overhead_slots)

    def _stage_output(
        self, stage: Stage, k: int, reach: Tensor, state: Optional[Tensor], layouts: list[Layout], capture: bool
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``_run_stage``, read from or kept in the batch's reuse when every real token reaches stage k."""
        key = self._whole_key(k, reach)
        if key is None:
            return self._run_stage(stage, k, reach, state, layouts, capture)
        hidden, input_state = self.reuse.state(key, lambda: self._run_stage(stage, k, reach, state, layouts, True))
        return hidden, input_state if capture else None

    def _head(
        self,
        stage: Stage,
        k: int,
        hidden: Tensor,
        targets: Tensor,
        exit_rule=None,
        input_state: Optional[Tensor] = None,
        reach: Optional[Tensor] = None,
    ) -> HeadResult:
        """The exit head over ``hidden``; ``reach``: the tokens it covers, given where reuse may serve it."""
        self.head_tokens[-1] += hidden.shape[0]

        def compute() -> HeadResult:
            return run_exit_head(
                stage,
                k,
                hidden,
                targets,
                exit_rule,
                input_state,
                keep_logits=self.return_logits,
                chunk_tokens=self.chunk_tokens,
                probe=self.probe,
            )

        key = None if reach is None else self._whole_key(k, reach)
        if key is None:
            return compute()
        return self.reuse.head((*key, "head", exit_rule is not None, self.chunk_tokens), compute)

    def _decide(
        self, stage: Stage, k: int, last: bool, reach: Tensor, hidden: Tensor, input_state: Optional[Tensor]
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Exit decision and scatter for one stage; returns (flat indices, hidden) of continuing tokens."""
        self.head_tokens.append(0)
        decides = self.method != "full" and (not last or (self.last_confidence and self.method == "routed"))
        self.decided.append(reach.numel() if decides else 0)
        targets = self.batch.targets[reach]
        exit_rule = stage.exit_rule
        if self.method == "full":
            if last:
                with self.probe.span(f"stage{k}.exit"):
                    head = self._head(stage, k, hidden, targets, reach=reach)
                with self.probe.span(f"stage{k}.scatter"):
                    self._record(k, reach, head)
            self.exited.append(reach.numel() if last else 0)
            return reach, hidden
        if self.method == "masked":
            with self.probe.span(f"stage{k}.exit"):
                head = self._head(stage, k, hidden, targets, None if last else exit_rule, input_state, reach)
                exits = self.alive if last else self.alive & (head.confidence >= self.thresholds[k])
            with self.probe.span(f"stage{k}.scatter"):
                self.stage_nll[k, reach] = head.nll
                self.stage_pred[k, reach] = head.prediction
                if not last:
                    self.stage_conf[k, reach] = head.confidence
                self._record(k, reach[exits], _select(head, exits))
                self.exited.append(int(exits.sum()))
                self.alive = self.alive & ~exits
            return reach, hidden
        staying = (~self._route(stage, k, last, reach, hidden, input_state, targets)).nonzero().squeeze(1)
        return reach.index_select(0, staying), hidden.index_select(0, staying)

    def _route(
        self,
        stage: Stage,
        k: int,
        last: bool,
        reach: Tensor,
        hidden: Tensor,
        input_state: Optional[Tensor],
        targets: Tensor,
    ) -> Tensor:
        """Decide and record the exiting tokens; return the exit mask over ``reach``."""
        exit_rule = stage.exit_rule
        if last:
            with self.probe.span(f"stage{k}.exit"):
                scorer = exit_rule if self.last_confidence and exit_rule.needs_logits else None
                head = self._head(stage, k, hidden, targets, scorer, input_state, reach)
                scores = None
                if self.last_confidence:
                    scores = (
                        head.confidence if scorer is not None else self._confidence(k, exit_rule, input_state, hidden)
                    )
            with self.probe.span(f"stage{k}.scatter"):
                if scores is not None:
                    self.stage_conf[k, reach] = scores
                self.stage_nll[k, reach] = head.nll
                self.stage_pred[k, reach] = head.prediction
                self._record(k, reach, head)
                self.exited.append(reach.numel())
            return torch.ones_like(reach, dtype=torch.bool)
        if exit_rule.needs_logits:
            with self.probe.span(f"stage{k}.exit"):
                head = self._head(stage, k, hidden, targets, exit_rule, input_state, reach)
                confidence = head.confidence
                exits = confidence >= self.thresholds[k]
            with self.probe.span(f"stage{k}.scatter"):
                self.stage_nll[k, reach] = head.nll
                self.stage_pred[k, reach] = head.prediction
                # Every token that reached this stage is recorded as exiting here; the ones that
                # continue are recorded again where they do exit (``_open_end`` clears what is left),
                # which writes more than the exiting tokens but selects nothing.
                self._record(k, reach, head)
                self.exited.append(int(exits.sum()))
                self.stage_conf[k, reach] = confidence
            return exits
        else:
            # Confidence from hidden states alone: lm_head only for the tokens that exit here.
            with self.probe.span(f"stage{k}.exit"):
                confidence = self._confidence(k, exit_rule, input_state, hidden, reach)
                exits = confidence >= self.thresholds[k]
                head = self._head(stage, k, hidden[exits], targets[exits])
            with self.probe.span(f"stage{k}.scatter"):
                leaving = reach[exits]
                self.stage_nll[k, leaving] = head.nll
                self.stage_pred[k, leaving] = head.prediction
                self._record(k, leaving, head)
        with self.probe.span(f"stage{k}.scatter"):
            self.stage_conf[k, reach] = confidence
            self.exited.append(leaving.numel())
            return exits

    def _confidence(
        self, k: int, exit_rule, input_state: Optional[Tensor], hidden: Tensor, reach: Optional[Tensor] = None
    ) -> Tensor:
        """A logit-free rule's confidence; ``reach``: the tokens it covers, given where reuse may serve it."""

        def compute() -> Tensor:
            with self.probe.span(f"stage{k}.exit_rule"):
                return exit_rule(input_state, hidden, None)

        key = None if reach is None else self._whole_key(k, reach)
        return compute() if key is None else self.reuse.head((*key, "confidence"), compute)

    def _run_stage(
        self, stage: Stage, k: int, reach: Tensor, state: Optional[Tensor], layouts: list[Layout], capture: bool
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Run one stage over the tokens in ``reach``; return per-token hidden (and last-layer input)."""
        with self.probe.span(f"stage{k}.gather"):
            ids = self.batch.ids[reach] if k == 0 else None
            original = self.batch.positions[reach] if self.positions == "original" else None
            calls = []
            for layout in layouts:
                if original is None:
                    position_ids = torch.arange(layout.length, device=reach.device).expand(layout.num_rows, -1)
                else:
                    position_ids = to_dense(original, layout, fill=0)
                calls.append(
                    dict(
                        input_ids=to_dense(ids, layout) if ids is not None else None,
                        inputs_embeds=to_dense(state, layout) if ids is None else None,
                        attention_mask=torch.ones(
                            layout.num_rows, layout.length, dtype=torch.long, device=reach.device
                        ),
                        position_ids=position_ids,
                        capture_input_state=capture,
                    )
                )
        with self.probe.span(f"stage{k}.layers"):
            outs = [stage(**call) for call in calls]
        del calls
        with self.probe.span(f"stage{k}.scatter"):
            if len(layouts) == 1 and layouts[0].members is None:
                only = layouts[0]
                return (from_dense(outs[0].hidden, only), from_dense(outs[0].input_state, only) if capture else None)
            hidden = outs[0].hidden.new_empty(reach.numel(), stage.hidden_size)
            input_state = hidden.new_empty(hidden.shape) if capture else None
            for layout, out in zip(layouts, outs):
                scatter_members(hidden, layout, from_dense(out.hidden, layout))
                if capture:
                    scatter_members(input_state, layout, from_dense(out.input_state, layout))
            return hidden, input_state

    def _record(self, k: int, flat_index: Tensor, head: HeadResult) -> None:
        """Scatter: write exiting tokens' results back to their original positions."""
        self.nll[flat_index] = head.nll
        self.correct[flat_index] = head.correct
        self.exit_stage[flat_index] = k
        if self.method == "full":
            self.stage_nll[k, flat_index] = head.nll
            self.stage_pred[k, flat_index] = head.prediction
        if self.logits is not None and head.logits is not None:
            self.logits[flat_index] = head.logits

    def _open_end(self, continuing: Tensor) -> None:
        """Tokens that continue past the last stage run exit nowhere yet: exit stage S, no NLL,
        not correct, no logits (the last stage run recorded them as if they exited there)."""
        self.exit_stage[continuing] = len(self.stages)
        self.nll[continuing] = 0.0
        self.correct[continuing] = False
        if self.logits is not None:
            self.logits[continuing] = 0

    def _scored(self) -> Tensor:
        scored = torch.zeros_like(self.correct)
        scored[self.batch.tokens] = True
        scored &= self.batch.targets >= 0
        self.nll.masked_fill_(~scored, 0.0)
        self.correct &= scored
        return scored


def _select(head: HeadResult, keep: Tensor) -> HeadResult:
    return HeadResult(
        nll=head.nll[keep],
        correct=head.correct[keep],
        prediction=head.prediction[keep],
        confidence=None if head.confidence is None else head.confidence[keep],
        logits=None if head.logits is None else head.logits[keep],
    )
