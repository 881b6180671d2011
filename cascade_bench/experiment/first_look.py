"""A pretrained model's perplexity on a few validation batches, before the run spends minutes on it:
a model whose PPL is near its vocabulary size predicts nearly uniformly (an untrained or broken
checkpoint, or a tokenizer that is not its own), and the whole sweep would measure noise. The run
warns at once and records the figure; it does not stop (a user may mean to measure such a model)."""

from __future__ import annotations

from typing import Optional, Sequence

from ..routing.evaluation import evaluate
from ..stages.ensemble import Ensemble
from ..stages.llm import LLM

#: Validation batches the first look reads.
FIRST_LOOK_BATCHES = 2
#: A PPL above this share of the vocabulary size reads as near-uniform predictions.
NEAR_UNIFORM_SHARE = 0.5


def first_look(model, validation: Sequence, vocab_size: int, plausible: Sequence[float]) -> tuple[dict, Optional[str]]:
    """(the record: PPL, batches, tokens; a warning or None) for the unsplit ``model`` on the first
    ``FIRST_LOOK_BATCHES`` validation batches, against ``plausible`` (low, high) and ``vocab_size``."""
    batches = list(validation[:FIRST_LOOK_BATCHES])
    if not batches:
        return {"note": "no validation batches"}, None
    result = evaluate(Ensemble([LLM(model)]), batches, method="full")
    record = {"ppl": result.ppl, "batches": len(batches), "tokens": result.tokens, "vocab_size": vocab_size}
    low, high = plausible
    if result.ppl >= NEAR_UNIFORM_SHARE * vocab_size:
        return record, (
            f"the unsplit model's PPL on {len(batches)} validation batches is {result.ppl:,.1f}, near its vocabulary "
            f"size {vocab_size:,} (uniform predictions give {vocab_size:,}): is it a trained checkpoint, and is the "
            "tokenizer its own? The sweep will measure noise"
        )
    if not low <= result.ppl <= high:
        return record, (
            f"the unsplit model's PPL on {len(batches)} validation batches is {result.ppl:,.1f}, outside "
            f"plausible_ppl [{low:g}, {high:g}]: check the model, its tokenizer and the text (or set plausible_ppl)"
        )
    return record, None
