"""The oracle bound: each token exits at the earliest stage whose NLL is within ``tolerance`` nats
of the last stage's; the best any exit rule over these stages could do.

Per-stage NLLs come from the no-exit cascade (every stage sees every token), so later stages
have full context; the cost is the layer cost of the chosen exits and analytic FLOPs for the
token counts reaching each stage (rows of the reaching tokens, no padding, exit heads on every
token that reaches a stage). It has no wall time: nothing routes that way.

Which tokens it routes, and by what: every real token, as a routed pass does, each by its own true
next token. A scored token's is its target. A token the batch does not score (the context a
sliding window repeats from the previous window, marked -100) still has a next token in its
window: the oracle routes it by that one, exactly as it would route it if it were scored; it never
reads the placeholder target. A token with neither (an unscored last token of its row) follows the
full depth. PPL and the token count are over the scored tokens only; exit ratios, tokens entered,
layer cost and FLOPs over every real token, like every routed point's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from ..data.batch import next_token_targets, unpack_batch
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
        routing = routing_targets(input_ids, attention_mask, targets)
        out = forward_cascade(
            ensemble, input_ids, attention_mask, routing, method="masked", thresholds=[math.inf] * num_stages
        )
        scored = out.scored if targets is None else out.scored & (targets.to(out.scored.device) >= 0)
        stage_nll = out.stage_nll.double()  # (S, B, T), every stage computed for every token
        real = out.exit_stage >= 0
        good_enough = stage_nll <= stage_nll[-1] + tolerance
        first_good = torch.where(out.scored, good_enough.int().argmax(dim=0), num_stages - 1)  # no target: full depth
        exit_stage = torch.where(real, first_good, -1)  # first stage within tolerance
        chosen = stage_nll.gather(0, exit_stage.clamp(min=0)[None]).squeeze(0)
        shapes, heads, entered = [], [], []
        for k in range(num_stages):
            per_row = ((exit_stage >= k) & real).sum(dim=1)
            entered.append(int(per_row.sum()))
            shapes.append([(1, int(n)) for n in per_row.tolist() if n > 0])
            heads.append(int(per_row.sum()))
        flops = sum(c.total for c in routed_cost(configs, shapes, heads, head_macs=head_macs_of(ensemble)))
        return [float(chosen[scored].sum()), int(scored.sum()), flops, *entered]

    with evaluation_mode(ensemble), torch.inference_mode():
        nll_sum, scored_total, flops, *entered = totals(per_batch, batches)

    layers = [stage.num_layers for stage in ensemble]
    total = entered[0]
    if not scored_total:
        raise ValueError("oracle_bound got batches with no scored token (every target is negative)")
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


def routing_targets(input_ids: torch.Tensor, attention_mask, targets) -> torch.Tensor:
    """(B, T) the id each real token is routed by: its target where the batch scores it, else the next
    real token of its row in the window, else -100 (no next token: it follows the full depth)."""
    following = next_token_targets(input_ids, attention_mask)
    if targets is None:
        return following
    targets = targets.to(following.device).long()
    return torch.where(targets >= 0, targets, following)
