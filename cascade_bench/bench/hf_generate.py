"""Hugging Face ``generate`` as a timed peer: greedy, exactly N new tokens, decode time only.

Shared by the decoding benchmarks (``decoding``, ``decode_suite``). Two things around the call:
transformers' own assisted generation logs a deprecation about its internal call (filtered here,
nothing a user can change), and its early-exit assistant sets ``num_hidden_layers`` on the
model's config and may leave it set when it fails (restored after every call).
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..measure.timing import synchronize

#: transformers' own assisted generation (``candidate_generator``) calls the assistant's ``generate`` with
#: a ``generation_config`` and ``min_new_tokens``/``max_new_tokens`` together, and ``generate`` then logs
#: this deprecation about that internal call. Our calls pass plain arguments only.
_INTERNAL_DEPRECATION = "Passing `generation_config` together with generation-related arguments"
_CANDIDATE_GENERATOR = "transformers/generation/candidate_generator.py"


class _TransformersOwnCall(logging.Filter):
    """Drops ``_INTERNAL_DEPRECATION`` when transformers' candidate generator made the call (nothing a
    user of ours can change); the same line from any other caller, ours included, passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_INTERNAL_DEPRECATION):
            return True
        frame = sys._getframe()
        while frame is not None:
            if frame.f_code.co_filename.replace(chr(92), "/").endswith(_CANDIDATE_GENERATOR):
                return False
            frame = frame.f_back
        return True


@contextmanager
def _without_transformers_internal_deprecation():
    logger = logging.getLogger("transformers.generation.utils")
    own_call = _TransformersOwnCall()
    logger.addFilter(own_call)
    try:
        yield
    finally:
        logger.removeFilter(own_call)


@dataclass
class Call:
    """One timed decoding call: decode seconds (scaled to all generated tokens), the generated
    tokens (B, N), per-token latencies, and for speculative methods their counts and component
    seconds (the draft's includes prompt lookup)."""

    seconds: float
    tokens: Tensor
    token_seconds: list = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    rejections: int = 0
    rounds: int = 0
    loop_rounds: int = 0
    emitted: int = 0
    draft_calls: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    speculative: bool = False
    nll: Optional[Tensor] = None  # (B, N) each token's NLL under the real model, where the method gives it


def hf_generate_timed(model, ids: Tensor, mask: Tensor, new_tokens: int, pad_id: int, **options) -> Call:
    """Hugging Face ``generate``, greedy, exactly ``new_tokens`` tokens. Decode time runs from the first
    to the last stopping-criteria call (the prompt's pass, which yields the first token, excluded) and
    is scaled to all ``new_tokens`` tokens; latencies: each call's interval shared by its tokens."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[tuple[float, int]] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            synchronize(input_ids.device)
            stamps.append((time.perf_counter(), input_ids.shape[1]))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    layers = model.config.num_hidden_layers
    try:
        with _without_transformers_internal_deprecation(), torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=None,
                stopping_criteria=StoppingCriteriaList([Stamp()]),
                **options,
            )
    finally:
        model.config.num_hidden_layers = layers
    batch = ids.shape[0]
    (t0, n0), (t1, n1) = stamps[0], stamps[-1]
    latencies = []
    for (a, m), (b, n) in zip(stamps, stamps[1:]):
        latencies.extend([(b - a) / (n - m)] * ((n - m) * batch))
    seconds = (t1 - t0) * (n1 - ids.shape[1]) / max(n1 - n0, 1)
    return Call(seconds=seconds, tokens=out[:, ids.shape[1] :], token_seconds=latencies)
