"""Analytic cost model: FLOPs from the config and the shapes that ran (or would run).

Same conventions as the counted FLOPs (``flops.py``), so the two agree exactly:
2 FLOPs per multiply-add; per decoder layer and token the projections
``d*(H*hd) + 2*d*(Hkv*hd) + (H*hd)*d`` and the MLP ``m*d*I`` MACs (m = 2 up/down or 3 gated);
attention counted **full** (non-causal), ``2*H*hd*L*L`` MACs per layer for a row of length L
padded or not; the exit head ``d*V`` per token whose logits are computed (plus ``d*d`` where a
translator reads the residual stream for it: ``stages.blocks.Translator``). Norms, activations,
rotary embeddings, softmax and the built-in exit confidences are elementwise and count 0, as in
the counter; an exit rule with matmuls of its own (a learned classifier, a reduced head) adds its
``macs_per_token`` for every token it decides on.

Memory layers (``models.memory_lm``): the same projections and MLP; softmax attention only inside
segments of ``segment_length`` (a row longer than one segment is padded to whole segments,
``2*H*hd*n*n`` MACs per segment; a shorter row is one ``L x L`` attention); and per token the
linear-attention terms of each compressive memory, which do not grow with the context: a read
``d*d + d`` (the banks are summed before the product), a write ``d*d`` (the delta rule adds a read),
plus the layer's own matmuls (``multi_memory``: key/value projections ``2*M*d*d`` and the mix over
``M`` reads ``2*M*d``; ``hierarchical``: the expansion gate ``2*d*d`` and one summary write ``d*d``
per segment). A stage keeps no memory state, so the last segment of a row is not written. They
count as dense FLOPs. Cached decoding of memory layers is not modelled here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..stages.families import LayerShape, layer_kinds, layer_shape


def dense_macs_per_token(shape: LayerShape) -> int:
    """Projection + MLP MACs of one layer for one token."""
    d, q, kv = shape.hidden_size, shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return d * q + 2 * d * kv + q * d + shape.mlp_matrices * d * shape.intermediate_size


def attention_macs(shape: LayerShape, rows: int, length: int, keys: Optional[int] = None) -> int:
    """QK^T and PV MACs of one layer over a (rows, length) batch, counted full; ``keys``: keys each
    query is scored against when they are more than the batch's own (cached or propagated ones)."""
    return 2 * rows * shape.num_heads * shape.head_dim * length * (length if keys is None else keys)


def kv_projection_macs(shape: LayerShape) -> int:
    """Key and value projection MACs of one layer for one token (what K/V propagation costs)."""
    return 2 * shape.hidden_size * shape.num_kv_heads * shape.head_dim


def memory_layer_macs(config, kind: str, rows: int, length: int) -> tuple[int, int]:
    """(memory, local attention) MACs of one memory layer of ``kind`` over a (rows, length) batch,
    beyond the projections and MLP every layer has (see the module docstring). A stage keeps no
    memory state, so the last segment is read but never written."""
    shape = layer_shape(config)
    d, n, m = shape.hidden_size, int(config.segment_length), int(getattr(config, "num_memories", 1))
    segments = -(-length // n)
    if length <= n:
        local = 2 * shape.num_heads * shape.head_dim * length * length
    else:
        local = 2 * shape.num_heads * shape.head_dim * segments * n * n
    read, write = d * d + d, d * d + (d * d + d if config.delta_rule else 0)
    written = (segments - 1) * n  # tokens of the segments before the last (all full)
    if kind == "infini":
        macs = read * length + write * written
    elif kind == "multi_memory":  # M reads mixed by attention over them; M projected key/value pairs written
        macs = (m * read + 2 * m * d) * length + (2 * m * d * d + m * write) * written
    else:  # hierarchical: coarse and fine reads and the expansion gate; fine per token, coarse per segment
        macs = (2 * read + 2 * d * d) * length + write * (written + segments - 1)
    return rows * macs, rows * local


@dataclass(frozen=True)
class StageCost:
    """Analytic FLOPs of one stage: layers (dense + attention), exit head and the exit rule's own matmuls."""

    dense: int
    attention: int
    exit_head: int
    exit_rule: int = 0

    @property
    def layers(self) -> int:
        return self.dense + self.attention

    @property
    def total(self) -> int:
        return self.layers + self.exit_head + self.exit_rule


def stage_cost(
    config,
    batch_shapes: Sequence[tuple[int, ...]],
    head_tokens: int,
    exit_rule_macs: int = 0,
    propagated_tokens: int = 0,
    head_macs_per_token: Optional[int] = None,
) -> StageCost:
    """FLOPs of one stage that ran dense batches of the given (rows, length) or (rows, length, keys),
    computed logits for ``head_tokens`` tokens (``head_macs_per_token`` multiply-adds each; default
    d x V), spent ``exit_rule_macs`` multiply-adds deciding and propagated the keys/values of
    ``propagated_tokens`` exited tokens into its layers."""
    shape = layer_shape(config)
    slots = sum(rows * length for rows, length, *_ in batch_shapes)
    dense = shape.num_layers * (dense_macs_per_token(shape) * slots + kv_projection_macs(shape) * propagated_tokens)
    attention = 0
    for kind in layer_kinds(config):
        if kind in ("attention", "pythia"):
            attention += sum(attention_macs(shape, *batch) for batch in batch_shapes)
            continue
        for rows, length, *_ in batch_shapes:
            memory, local = memory_layer_macs(config, kind, rows, length)
            dense, attention = dense + memory, attention + local
    per_token = shape.hidden_size * shape.vocab_size if head_macs_per_token is None else head_macs_per_token
    head = head_tokens * per_token
    return StageCost(dense=2 * dense, attention=2 * attention, exit_head=2 * head, exit_rule=2 * exit_rule_macs)


def routed_cost(
    configs: Sequence,
    stage_batch_shapes,
    head_tokens: Sequence[int],
    exit_rule_macs: Optional[Sequence[int]] = None,
    propagated_tokens: Optional[Sequence[int]] = None,
    head_macs: Optional[Sequence[int]] = None,
) -> tuple[StageCost, ...]:
    """Per-stage analytic FLOPs of a pass, from RoutedOutput.stage_batch_shapes and .head_tokens;
    ``exit_rule_macs`` per stage: RoutedOutput.decided_tokens x the rule's ``macs_per_token``;
    ``propagated_tokens``: RoutedOutput.propagated_tokens (K/V propagation); ``head_macs``: per
    stage, its exit head's multiply-adds per token (``head_macs_of(stages)``; default d x V)."""
    rule = exit_rule_macs if exit_rule_macs is not None else [0] * len(configs)
    kv = propagated_tokens if propagated_tokens else [0] * len(configs)
    heads = head_macs if head_macs is not None else [None] * len(configs)
    return tuple(
        stage_cost(c, shapes, n, m, p, h)
        for c, shapes, n, m, p, h in zip(configs, stage_batch_shapes, head_tokens, rule, kv, heads)
    )


def head_macs_of(stages: Sequence) -> list[int]:
    """Per stage, its exit head's multiply-adds per token (``head_macs_per_token``)."""
    return [stage.head_macs_per_token for stage in stages]


def exit_rule_macs(stages: Sequence, decided_tokens: Sequence[int]) -> list[int]:
    """Per stage, the multiply-adds its exit rule spent: tokens decided x ``macs_per_token``."""
    return [n * stage.exit_rule.macs_per_token for stage, n in zip(stages, decided_tokens)]


def decision_flops(costs: Sequence[StageCost], head_tokens: Sequence[int], tokens_exited: Sequence[int]) -> list[int]:
    """Per stage, the FLOPs its exit decision computed that no token's prediction uses: the rule's own
    matmuls plus the exit-head logits of tokens that reached the stage's head and did not exit there."""
    return [
        cost.exit_rule + (cost.exit_head // heads * (heads - exited) if heads > exited else 0)
        for cost, heads, exited in zip(costs, head_tokens, tokens_exited)
    ]


def padding_flops(config, batch_shapes: Sequence[tuple[int, ...]], row_lengths: Sequence[int]) -> int:
    """FLOPs a stage spent on padding: the batches that ran minus the same rows unpadded (with
    propagated keys, (rows, length, keys), each row keeps the batch's extra keys: approximate)."""
    extra = max((batch[2] - batch[1] for batch in batch_shapes if len(batch) == 3), default=0)
    unpadded = stage_cost(config, [(1, n, n + extra) for n in row_lengths if n > 0], 0)
    return stage_cost(config, batch_shapes, 0).layers - unpadded.layers


def expected_cost(
    configs: Sequence,
    continue_ratios: Sequence[float],
    seq_len: int,
    batch_size: int = 1,
    heads_on_all_reaching: bool = True,
) -> tuple[StageCost, ...]:
    """Expected per-stage FLOPs for a configuration too large to run: stage k is reached by a
    fraction ``prod(continue_ratios[:k])`` of the tokens, spread evenly over the rows (no padding).

    ``heads_on_all_reaching``: exit rules that need logits (max_prob, margin, neg_entropy) compute
    the head for every token reaching a stage; logit-free rules (cos_sim) only for those exiting.
    """
    if len(continue_ratios) != len(configs) - 1:
        raise ValueError(
            f"expected {len(configs) - 1} continue ratios for {len(configs)} stages, got {len(continue_ratios)}"
        )
    reaching, costs = 1.0, []
    for k, config in enumerate(configs):
        length = round(reaching * seq_len)
        last = k == len(configs) - 1
        leaving = reaching if last else reaching * (1 - continue_ratios[k])
        head_share = reaching if (heads_on_all_reaching or last) else leaving
        costs.append(
            stage_cost(config, [(batch_size, length)] if length else [], round(head_share * seq_len * batch_size))
        )
        if not last:
            reaching *= continue_ratios[k]
    return tuple(costs)
