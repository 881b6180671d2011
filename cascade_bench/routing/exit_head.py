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
from ..stages.exits import ExitFunction
from ..stages.llm import LLM

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
    stage: LLM,
    stage_index: int,
    hidden: Tensor,
    targets: Tensor,
    exit_function: Optional[ExitFunction] = None,
    input_state: Optional[Tensor] = None,
    keep_logits: bool = False,
    chunk_tokens: Optional[int] = None,
    probe: Probe = NO_PROBE,
) -> HeadResult:
    """Project ``hidden`` (n, d) through the stage's lm_head and reduce per token.

    targets: (n,) token ids, negative = not scored. If ``exit_function`` is given, its confidence
    is computed on the same logits chunk (``input_state`` (n, d) passed through).
    Raises ValueError if any logit row is not finite. Spans: ``stage{k}.exit_head`` (logits, NLL,
    argmax) and ``stage{k}.exit_fn`` (confidence), once per chunk.
    """
    head_span, fn_span = f"stage{stage_index}.exit_head", f"stage{stage_index}.exit_fn"
    n = hidden.shape[0]
    vocab = stage.vocab_size
    if chunk_tokens is None:
        chunk_tokens = max(MIN_CHUNK_TOKENS, LOGITS_CHUNK_ELEMENTS // vocab)
    nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
    correct = torch.empty(n, dtype=torch.bool, device=hidden.device)
    prediction = torch.empty(n, dtype=torch.long, device=hidden.device)
    confidence = torch.empty(n, dtype=torch.float32, device=hidden.device) if exit_function is not None else None
    kept = [] if keep_logits else None
    safe_targets = targets.clamp(min=0)
    bad = torch.zeros((), dtype=torch.bool, device=hidden.device)
    for start in range(0, n, chunk_tokens):
        stop = min(start + chunk_tokens, n)
        with probe.span(head_span):
            logits = stage.logits(hidden[start:stop])
            logits32 = logits.float()  # no copy when the model already runs in float32
            # One max pass gives argmax and the logsumexp shift; one temporary for exp(logits - max).
            max_logit, argmax = logits32.max(dim=-1)
            log_z = (logits32 - max_logit[:, None]).exp_().sum(dim=-1).log_().add_(max_logit)
            bad |= ~torch.isfinite(log_z).all()
            target_logit = logits32.gather(1, safe_targets[start:stop, None]).squeeze(1)
            nll[start:stop] = log_z - target_logit
            correct[start:stop] = argmax == targets[start:stop]
            prediction[start:stop] = argmax
        if exit_function is not None:
            with probe.span(fn_span):
                h_in = input_state[start:stop] if input_state is not None else None
                confidence[start:stop] = exit_function(
                    h_in, hidden[start:stop], logits32, log_normalizer=log_z, max_logit=max_logit
                )
        if kept is not None:
            kept.append(logits)
    if n and bool(bad):
        raise ValueError(
            f"stage {stage_index} produced non-finite logits (NaN or inf); refusing to report a "
            f"perplexity from them: check the model weights and dtype ({stage.dtype})"
        )
    return HeadResult(
        nll=nll, correct=correct, prediction=prediction, confidence=confidence, logits=torch.cat(kept) if kept else None
    )
