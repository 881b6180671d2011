"""Test helpers: tiny from_config cascades of every supported family, real-text token batches,
and a scripted exit function."""

from __future__ import annotations

import math

import torch

from cascade_bench.data.corpus import byte_token_windows
from cascade_bench.stages.presets import build_blocks, build_ensemble

FAMILIES = ("gpt2-tiny", "llama-tiny", "gpt_neox-tiny")
BATCHING = ("padded", "bucketed")
#: The two kinds of stage: whole LLMs (a cascade of models) and blocks cut from one model.
KINDS = ("llm", "block")


def token_batch(text: str, batch_size: int, seq_len: int, offset: int = 0) -> torch.Tensor:
    """Real text as byte ids (vocab 256), shape (batch_size, seq_len)."""
    return byte_token_windows(text[offset:], batch_size, seq_len)


def tiny_ensemble(preset: str, layers=(2, 2), exit_fn="max_prob", seed=0, kind: str = "llm"):
    """A tiny cascade: one model per stage (``kind="llm"``) or one model cut into blocks."""
    build = build_ensemble if kind == "llm" else build_blocks
    return build(preset, layers, exit_fn=exit_fn, seed=seed).eval()


class ScriptedExit:
    """A test exit function with scripted per-token confidences.

    It recognises each token by its exact stage output (nearest probe hidden state, computed
    beforehand on the same dense batch) and returns the confidence scripted for that (b, t).
    Needs no logits, so it also exercises the logit-free routing path.
    """

    needs_logits = False
    needs_input_state = False

    def __init__(self, probe_hidden: torch.Tensor, confidence: torch.Tensor):
        self.probe = probe_hidden.reshape(-1, probe_hidden.shape[-1])
        self.confidence = confidence.reshape(-1).float()

    def __call__(self, h_in, h_out, logits):
        nearest = torch.cdist(h_out.float(), self.probe.float()).argmin(dim=1)
        return self.confidence[nearest]


def scripted_exit(ensemble, input_ids: torch.Tensor, exits: torch.Tensor):
    """ScriptedExit for stage 0 where token (b, t) exits iff ``exits[b, t]`` (use threshold 0.5).

    Tokens whose stage-0 state is identical (same prefix in two sequences: causal attention makes
    them the same token to the model) must share a decision; they take the first one's. Returns
    (exit function, the decisions actually scripted (B, T) bool).
    """
    with torch.inference_mode():
        hidden = ensemble[0](input_ids=input_ids).hidden.reshape(-1, ensemble[0].hidden_size)
    first_twin = torch.cdist(hidden, hidden).argmin(dim=1)  # ties resolve to the first index
    scripted = exits.reshape(-1)[first_twin].reshape(exits.shape)
    return ScriptedExit(hidden, scripted.float()), scripted


INF = math.inf
#: Every family the router runs: the Hugging Face ones and the toolkit's own memory-layer family
#: (models.memory_lm; its cached decoding needs every row in every call, so generation tests keep FAMILIES).
ROUTED_FAMILIES = FAMILIES + ("memory-tiny",)
