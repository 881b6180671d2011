"""Exit head: logits for the tokens that need them, in chunks, reduced at once to per-token numbers.

Full (N, V) logits are the memory bottleneck of early exit, so by default they never exist:
each chunk of tokens is projected by ``lm_head``, reduced to NLL, argmax and confidence in
float32, and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..measure.probes import NO_PROBE, Probe
from ..stages.exits import ExitRule
from ..stages.stage import Stage

#: Default logits chunk: about 8 MiB of float32 logits at a time. Small enough to stay in the
#: allocator's heap (a fresh 64 MiB block per chunk costs more in page faults than its math).
LOGITS_CHUNK_ELEMENTS = 1 << 21
#: ...but never fewer tokens than this per chunk: below it the lm_head matmul loses more than the
#: heap saves. Measured on SmolLM2's head (576 x 49,152, 2,048 tokens, 2 CPU threads): 71 GFLOP/s
#: in chunks of 42 tokens (the element budget alone), 122 in chunks of 256, 136 in one chunk.
MIN_CHUNK_TOKENS = 256


@dataclass
class HeadResult:
    """Per-token results of one exit head over n tokens.

    nll: (n,) float32 negative log-likelihood of the target (meaningless where target < 0).
    correct: (n,) bool, argmax == target.
    prediction: (n,) int64 argmax.
    confidence: (n,) float32 or None when not asked for.
    logits: (n, V) in the model dtype, only when asked for.
    """

    nll: Tensor
    correct: Tensor
    prediction: Tensor
    confidence: Optional[Tensor] = None
    logits: Optional[Tensor] = None


def run_exit_head(
    stage: Stage,
    stage_index: int,
    hidden: Tensor,
    targets: Tensor,
    exit_rule: Optional[ExitRule] = None,
    input_state: Optional[Tensor] = None,
    keep_logits: bool = False,
    chunk_tokens: Optional[int] = None,
    probe: Probe = NO_PROBE,
) -> HeadResult:
    """Project ``hidden`` (n, d) through the stage's lm_head and reduce per token.

    targets: (n,) token ids, negative = not scored. If ``exit_rule`` is given, its confidence
    is computed on the same logits chunk (``input_state`` (n, d) passed through).
    Raises ValueError if any logit row is not finite. Spans: ``stage{k}.exit_head`` (logits, NLL,
    argmax) and ``stage{k}.exit_rule`` (confidence), once per chunk.
    """
    n = hidden.shape[0]
    if chunk_tokens is None:
        chunk_tokens = max(MIN_CHUNK_TOKENS, LOGITS_CHUNK_ELEMENTS // stage.vocab_size)
    safe_targets = targets.clamp(min=0)
    chunks = [
        _reduce_chunk(
            stage,
            stage_index,
            hidden[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
            safe_targets[start : start + chunk_tokens],
            exit_rule,
            input_state[start : start + chunk_tokens] if input_state is not None else None,
            keep_logits,
            probe,
        )
        for start in range(0, n, chunk_tokens)
    ]
    if not chunks:
        empty = hidden.new_empty(0, dtype=torch.float32)
        return HeadResult(
            nll=empty,
            correct=empty.bool(),
            prediction=empty.long(),
            confidence=empty if exit_rule is not None else None,
            logits=hidden.new_empty(0, stage.vocab_size) if keep_logits else None,
        )
    head, finite = chunks[0] if len(chunks) == 1 else _joined(chunks)
    if not bool(finite):
        raise ValueError(
            f"stage {stage_index} produced non-finite logits (NaN or inf); refusing to report a "
            f"perplexity from them: check the model weights and dtype ({stage.dtype})"
        )
    return head


def _reduce_chunk(
    stage: Stage,
    stage_index: int,
    hidden: Tensor,
    targets: Tensor,
    safe_targets: Tensor,
    exit_rule: Optional[ExitRule],
    input_state: Optional[Tensor],
    keep_logits: bool,
    probe: Probe,
) -> tuple[HeadResult, Tensor]:
    """One chunk's logits reduced to per-token results, and whether every logsumexp is finite."""
    with probe.span(f"stage{stage_index}.exit_head"):
        logits = stage.logits(hidden)
        logits32 = logits.float()  # no copy when the model already runs in float32
        # One max pass gives argmax and the logsumexp shift; one temporary for exp(logits - max).
        max_logit, argmax = logits32.max(dim=-1)
        log_z = (logits32 - max_logit[:, None]).exp_().sum(dim=-1).log_().add_(max_logit)
        finite = torch.isfinite(log_z).all()
        nll = log_z - logits32.gather(1, safe_targets[:, None]).squeeze(1)
    confidence = None
    if exit_rule is not None:
        with probe.span(f"stage{stage_index}.exit_rule"):
            confidence = exit_rule(input_state, hidden, logits32, log_normalizer=log_z, max_logit=max_logit).float()
    head = HeadResult(
        nll=nll,
        correct=argmax == targets,
        prediction=argmax,
        confidence=confidence,
        logits=logits if keep_logits else None,
    )
    return head, finite


def _joined(chunks: list[tuple[HeadResult, Tensor]]) -> tuple[HeadResult, Tensor]:
    heads = [head for head, _ in chunks]

    def cat(field: str) -> Optional[Tensor]:
        parts = [getattr(head, field) for head in heads]
        return None if parts[0] is None else torch.cat(parts)

    joined = HeadResult(
        nll=cat("nll"),
        correct=cat("correct"),
        prediction=cat("prediction"),
        confidence=cat("confidence"),
        logits=cat("logits"),
    )
    return joined, torch.stack([finite for _, finite in chunks]).all()
