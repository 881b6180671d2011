"""Evaluation over a dataloader: perplexity, accuracy, hard/easy PPL, exit ratios and layer cost."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from ..data.batch import unpack_batch
from ..measure.distributed import all_ranks, current_ranks, shard, summed
from ..measure.environment import environment_conditions
from ..stages.ensemble import Ensemble, evaluation_mode
from .passes import forward_cascade


@dataclass(frozen=True)
class EvalResult:
    """Quality and routing statistics of one method over a dataset (a typed record; reports format it).

    Perplexities are exp(mean NLL) over scored tokens. Hard tokens are those that continued past
    stage 0 (exit stage > 0), easy ones exited at stage 0. ``hard_ppl_stage0`` is the stage-0
    perplexity of the hard tokens (NaN when stage 0's head was not computed for them, e.g. with
    a logit-free exit rule). ``layer_cost`` is docs/design.md section 3's ratio over real tokens, with
    the tokens a stage computed (``tokens_computed``: reached + recomputed under the ``recompute``
    K/V policy); ``tokens_propagated``: exited tokens whose keys/values entered each stage.
    ``window_sums``: per evaluation window (a row of a batch) with a scored token, its sums in the
    order of ``measure.intervals.WINDOW_FIELDS`` (scored tokens, NLL, correct, hard tokens, hard NLL,
    easy NLL): what the confidence intervals resample.
    """

    method: str
    thresholds: tuple[float, ...]
    layers_per_stage: tuple[int, ...]
    tokens: int
    routed_tokens: int
    nll_sum: float
    ppl: float
    accuracy: float
    hard_tokens: int
    hard_ppl: float
    easy_ppl: float
    hard_ppl_stage0: float
    tokens_entered: tuple[int, ...]
    tokens_exited: tuple[int, ...]
    exit_ratios: tuple[float, ...]
    layer_cost: float
    padding_waste: tuple[float, ...]
    conditions: dict = field(default_factory=dict)
    kv_policy: str = "absent"
    tokens_computed: tuple[int, ...] = ()
    tokens_propagated: tuple[int, ...] = ()
    window_sums: tuple[tuple[float, ...], ...] = ()


def _ppl(nll_sum: float, count: float) -> float:
    return math.exp(nll_sum / count) if count else math.nan


def evaluate(
    ensemble: Ensemble,
    batches: Iterable,
    method: str = "routed",
    conditions: Optional[dict] = None,
    progress: bool = False,
    **forward_kwargs,
) -> EvalResult:
    """Run ``method`` (see routing.METHODS) over every batch and aggregate.

    Runs in eval mode (each module's own mode restored afterwards) under ``torch.inference_mode``.
    Inside ``measure.distributed.sharded`` each rank evaluates its share of ``batches`` and the
    result covers all of them. ``conditions`` (dataset, split, window, stride, tokenizer, seed, ...) is merged with the
    environment (device, dtype, threads, versions, git commit) into the record.
    """
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"evaluate {method}", unit="batch")
    totals = Totals(ensemble.device)
    with evaluation_mode(ensemble), torch.inference_mode():
        for item in shard(batches):
            input_ids, attention_mask, targets = unpack_batch(item)
            totals.add(forward_cascade(ensemble, input_ids, attention_mask, targets, method=method, **forward_kwargs))
    return totals.result(ensemble, method, conditions)


class Totals:
    """Running sums over the ``RoutedOutput`` of each batch of a pass (kept on the device, read
    once at the end), turned into an ``EvalResult`` by :meth:`result`. ``evaluate`` runs its own
    pass; ``measure_cost`` feeds it the outputs of its counted pass."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(8, dtype=torch.float64, device=device)
        self.entered: Optional[list[int]] = None
        self.computed: Optional[list[int]] = None
        self.propagated: Optional[list[int]] = None
        self.exited: Optional[list[int]] = None
        self.slots: Optional[list[int]] = None
        self.shapes: set = set()
        self.windows: list[torch.Tensor] = []
        self.last = None

    def add(self, out) -> None:
        self.shapes.add(tuple(out.nll.shape))
        scored = out.scored
        hard = scored & (out.exit_stage > 0)
        easy = scored & (out.exit_stage == 0)
        nll = out.nll.double()  # float64 sums: a long split must not lose digits
        stage0 = out.stage_nll[0].double()
        hard_has_stage0 = hard & ~torch.isnan(stage0)
        self.sums += (
            torch.stack(
                [
                    scored.sum(),
                    nll.sum(),
                    out.correct.sum(),
                    hard.sum(),
                    nll[hard].sum(),
                    nll[easy].sum(),
                    hard_has_stage0.sum(),
                    stage0[hard_has_stage0].sum(),
                ]
            )
            .double()
            .to(self.sums.device)
        )
        self.windows.append(_window_sums(out.nll.double(), scored, out.correct, hard, easy))
        self.entered = _add(self.entered, out.tokens_entered)
        self.computed = _add(self.computed, out.tokens_computed)
        self.propagated = _add(self.propagated, out.propagated_tokens or (0,) * len(out.tokens_entered))
        self.exited = _add(self.exited, out.tokens_exited)
        self.slots = _add(self.slots, out.slots_computed)
        self.last = out

    def _combined(self) -> tuple[list, ...]:
        """The sums of every rank's share (this process's alone when not sharded): float64 sums in rank
        order, token counts as exact ints."""
        counts = [self.entered, self.computed, self.propagated, self.exited, self.slots]
        flat = summed(self.sums.tolist() + [n for part in counts for n in part])
        sums, rest = flat[:8], flat[8:]
        stages = len(self.entered)
        parts = [[int(n) for n in rest[i * stages : (i + 1) * stages]] for i in range(len(counts))]
        shapes = set().union(*all_ranks(self.shapes))
        mine = torch.cat(self.windows).cpu() if self.windows else torch.zeros(0, 6, dtype=torch.float64)
        windows = tuple(tuple(row) for part in all_ranks(mine[mine[:, 0] > 0].tolist()) for row in part)
        return (sums, *parts, shapes, windows)

    def result(self, ensemble: Ensemble, method: str, conditions: Optional[dict] = None) -> EvalResult:
        out = self.last
        if out is None:
            raise ValueError("evaluate got no batches")
        sums, entered, computed, propagated, exited, slots, shapes, windows = self._combined()
        tokens, nll_sum, correct, hard_n, hard_sum, easy_sum, hard0_n, hard0_sum = sums
        routed = entered[0]
        total_layers = sum(out.layers_per_stage)
        record_conditions = {
            **environment_conditions(ensemble.device, ensemble.dtype),
            "batch_shapes": sorted(shapes),
            **current_ranks().summary(),
            **(conditions or {}),
        }
        return EvalResult(
            method=method,
            thresholds=out.thresholds,
            layers_per_stage=out.layers_per_stage,
            tokens=int(tokens),
            routed_tokens=routed,
            nll_sum=nll_sum,
            ppl=_ppl(nll_sum, tokens),
            accuracy=correct / tokens if tokens else math.nan,
            hard_tokens=int(hard_n),
            hard_ppl=_ppl(hard_sum, hard_n),
            easy_ppl=_ppl(easy_sum, tokens - hard_n),
            hard_ppl_stage0=_ppl(hard0_sum, hard0_n) if hard0_n == hard_n else math.nan,
            tokens_entered=tuple(entered),
            tokens_exited=tuple(exited),
            exit_ratios=tuple(e / routed for e in exited),
            layer_cost=sum(n * l for n, l in zip(computed, out.layers_per_stage)) / (routed * total_layers),
            padding_waste=tuple((s - n) / s if s else 0.0 for s, n in zip(slots, computed)),
            conditions=record_conditions,
            kv_policy=out.kv_policy,
            tokens_computed=tuple(computed),
            tokens_propagated=tuple(propagated),
            window_sums=windows,
        )


def _window_sums(nll: torch.Tensor, scored, correct, hard, easy) -> torch.Tensor:
    """(B, 6) float64: per row, ``measure.intervals.WINDOW_FIELDS`` (``nll`` is 0 where not scored)."""
    return torch.stack(
        [scored.sum(1), nll.sum(1), correct.sum(1), hard.sum(1), (nll * hard).sum(1), (nll * easy).sum(1)], dim=1
    ).double()


def _add(total: Optional[list[int]], values: tuple[int, ...]) -> list[int]:
    return list(values) if total is None else [a + b for a, b in zip(total, values)]
