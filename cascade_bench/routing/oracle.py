"""The oracle bound: each token exits at the earliest stage whose NLL is within ``tolerance`` nats
of the last stage's; the best any exit rule over these stages could do.

Per-stage NLLs come from the no-exit cascade (every stage sees every token), so later stages
have full context; the cost is the layer cost of the chosen exits and analytic FLOPs for the
token counts reaching each stage (rows of the reaching tokens, no padding, exit heads on every
token that reaches a stage). It has no wall time: nothing routes that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..data.batch import unpack_batch
from ..measure.analytic import head_macs_of, routed_cost
from ..measure.distributed import totals
from ..stages.ensemble import Ensemble, evaluation_mode
from .passes import forward_cascade


@dataclass(frozen=True)
class OracleResult:
    tolerance: float
    tokens: int
    ppl: float
    accuracy_unavailable: bool
    exit_ratios: tuple[float, ...]
    tokens_entered: tuple[int, ...]
    layer_cost: float
    flops_analytic: int


def oracle_bound(ensemble: Ensemble, batches: Iterable, tolerance: float = 0.0) -> OracleResult:
    """Oracle exits over ``batches`` (see module docstring)."""
    num_stages = len(ensemble)
    configs = [stage.config for stage in ensemble]

    def per_batch(item) -> list:
        """[NLL sum, scored tokens, FLOPs, tokens entering each stage] of one batch's oracle exits."""
        input_ids, attention_mask, targets = unpack_batch(item)
        out = forward_cascade(
            ensemble, input_ids, attention_mask, targets, method="masked", thresholds=[math.inf] * num_stages
        )
        stage_nll = out.stage_nll.double()  # (S, B, T), every stage computed for every token
        real = out.exit_stage >= 0
        good_enough = stage_nll <= stage_nll[-1] + tolerance
        exit_stage = torch.where(real, good_enough.int().argmax(dim=0), -1)  # first stage within tolerance
        chosen = stage_nll.gather(0, exit_stage.clamp(min=0)[None]).squeeze(0)
        shapes, heads, entered = [], [], []
        for k in range(num_stages):
            per_row = ((exit_stage >= k) & real).sum(dim=1)
            entered.append(int(per_row.sum()))
            shapes.append([(1, int(n)) for n in per_row.tolist() if n > 0])
            heads.append(int(per_row.sum()))
        flops = sum(c.total for c in routed_cost(configs, shapes, heads, head_macs=head_macs_of(ensemble)))
        return [float(chosen[out.scored].sum()), int(out.scored.sum()), flops, *entered]

    with evaluation_mode(ensemble), torch.inference_mode():
        nll_sum, scored_total, flops, *entered = totals(per_batch, batches)

    layers = [stage.num_layers for stage in ensemble]
    total = entered[0]
    exited = [entered[k] - (entered[k + 1] if k + 1 < num_stages else 0) for k in range(num_stages)]
    return OracleResult(
        tolerance=tolerance,
        tokens=scored_total,
        ppl=math.exp(nll_sum / scored_total),
        accuracy_unavailable=True,
        exit_ratios=tuple(e / total for e in exited),
        tokens_entered=tuple(entered),
        layer_cost=sum(n * l for n, l in zip(entered, layers)) / (total * sum(layers)),
        flops_analytic=flops,
    )
