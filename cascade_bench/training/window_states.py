"""What the frozen model says about some windows, computed once and shared by every exit recipe.

``collect_window_states`` runs the unsplit causal LM over batches of windows (no early exit) and
keeps, per window position: the residual stream after each candidate layer (a state "after layer
l" is the input of layer l), the last layer's stream before the final norm, the full-depth model's
top-``top_k`` next-token log-probabilities (normalised over the whole vocabulary) and their ids,
the full-depth NLL of the target, and which positions are scored. Recipes that read only states
(translators, MLP exits, attention adapters) never run the trunk again; a recipe that changes the
trunk (LoRA) reads ``input_ids`` and the teacher's top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..measure.layer_exits import IGNORE_INDEX, LayerStates, check_layers
from ..stages.families import family_parts


@dataclass
class WindowStates:
    """Windows (W, T) seen by the unsplit model; see the module docstring.

    states: (W, T, len(layers), d); final_states: (W, T, d); top_logprobs / top_ids: (W, T, k), best
    first, so ``top_ids[..., 0]`` is the full-depth prediction; final_nll: (W, T) float64 (0 where not
    scored); scored: (W, T) bool; targets: (W, T) with -100 where not scored.
    """

    layers: tuple[int, ...]
    num_layers: int
    input_ids: Tensor
    attention_mask: Tensor
    targets: Tensor
    scored: Tensor
    states: Tensor
    final_states: Tensor
    top_logprobs: Tensor
    top_ids: Tensor
    final_nll: Tensor

    @property
    def windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        """Scored positions."""
        return int(self.scored.sum())

    @property
    def final_argmax(self) -> Tensor:
        return self.top_ids[..., 0]

    @property
    def final_ppl(self) -> float:
        return math.exp(float(self.final_nll[self.scored].mean()))

    def rows(self, index: Tensor) -> "WindowStates":
        """The same fields for the windows ``index``."""
        picked = {
            name: getattr(self, name)[index]
            for name in (
                "input_ids",
                "attention_mask",
                "targets",
                "scored",
                "states",
                "final_states",
                "top_logprobs",
                "top_ids",
                "final_nll",
            )
        }
        return WindowStates(layers=self.layers, num_layers=self.num_layers, **picked)

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not among the collected layers {list(self.layers)}")
        return self.layers.index(layer)

    def as_layer_states(self) -> LayerStates:
        """The scored positions, flattened (what ``measure.layer_exits`` reads)."""
        return LayerStates(
            layers=self.layers,
            num_layers=self.num_layers,
            states=self.states[self.scored],
            targets=self.targets[self.scored],
            final_argmax=self.final_argmax[self.scored],
            final_nll=self.final_nll[self.scored],
            final_states=self.final_states[self.scored],
        )


def token_windows(stream: Tensor, window: int, limit: int, batch_size: int) -> list[dict]:
    """Batches of disjoint windows of ``stream`` (N,) covering at most ``limit`` target tokens, every
    position scored: dicts with ``input_ids`` and ``targets`` (the next token), ``batch_size`` rows."""
    return balanced_token_windows({"text": stream}, window, limit, batch_size)[0]


def _padded(batch: dict, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, attention mask, targets) of ``batch`` padded on the right to ``length`` positions: the
    padding is masked out and not scored, and causal attention keeps it from the real positions."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    targets = batch["targets"]
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask, targets
    pad = torch.nn.functional.pad
    return pad(ids, (0, extra)), pad(mask, (0, extra)), pad(targets, (0, extra), value=IGNORE_INDEX)


def balanced_token_windows(
    streams: dict[str, Tensor], window: int, limit: int, batch_size: int
) -> tuple[list[dict], dict[str, int]]:
    """Like ``token_windows``, over several streams taken in turn (a window of each, then the next of
    each), so every source has an equal share of the ``limit`` tokens while it lasts; also returns
    the target tokens taken from each stream."""
    for name, value in (("window", window), ("limit", limit), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    cut = {
        name: [stream[i * window : (i + 1) * window + 1] for i in range((stream.numel() - 1) // window)]
        for name, stream in streams.items()
    }
    wanted = limit // window
    rows, taken = [], dict.fromkeys(streams, 0)
    for index in range(max((len(w) for w in cut.values()), default=0)):
        for name, windows in cut.items():
            if len(rows) < wanted and index < len(windows):
                rows.append(windows[index])
                taken[name] += window
    if not rows:
        raise ValueError(f"the text gives fewer than one window of {window + 1} tokens (or limit {limit} < window)")
    stacked = torch.stack(rows)
    batches = [
        {"input_ids": part[:, :-1].contiguous(), "targets": part[:, 1:].contiguous()}
        for part in stacked.split(batch_size)
    ]
    return batches, taken


@torch.inference_mode()
def collect_window_states(
    model, batches: Sequence[dict], layers: Sequence[int], top_k: int, chunk: int = 1024
) -> WindowStates:
    """Run ``model`` (unsplit, frozen) over ``batches`` (dicts with ``input_ids`` (B, T), ``targets``
    (-100 = not scored), optional ``attention_mask``); shorter windows are padded to the longest."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if not batches:
        raise ValueError("no batches to collect states from")
    parts = family_parts(model)
    num_layers = len(parts.layers)
    layers = check_layers(layers, num_layers)
    head = model.get_output_embeddings()
    device = head.weight.device
    kept: dict[str, list] = {k: [] for k in ("ids", "mask", "targets", "states", "finals", "logp", "top", "nll")}
    captured = {}
    hook = parts.final_norm.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0]))
    length = max(int(batch["input_ids"].shape[1]) for batch in batches)
    try:
        for batch in batches:
            ids, mask, targets = _padded(batch, length)
            ids, mask, targets = ids.to(device), mask.to(device), targets.to(device)
            out = parts.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            final = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])
            flat_targets = targets.reshape(-1)
            logp, top, nll = [], [], []
            for start in range(0, final.shape[0], chunk):
                log_probs = head(final[start : start + chunk]).float().log_softmax(-1)
                best = log_probs.topk(top_k, dim=-1)
                logp.append(best.values)
                top.append(best.indices)
                target = flat_targets[start : start + chunk]
                picked = log_probs.gather(-1, target.clamp(min=0)[:, None])[:, 0]
                nll.append(torch.where(target != IGNORE_INDEX, -picked, torch.zeros_like(picked)).double())
            shape = tuple(ids.shape)
            kept["ids"].append(ids)
            kept["mask"].append(mask)
            kept["targets"].append(targets)
            kept["states"].append(torch.stack([out.hidden_states[layer] for layer in layers], dim=2))
            kept["finals"].append(captured.pop("x"))
            kept["logp"].append(torch.cat(logp).reshape(*shape, top_k))
            kept["top"].append(torch.cat(top).reshape(*shape, top_k))
            kept["nll"].append(torch.cat(nll).reshape(shape))
    finally:
        hook.remove()
    targets = torch.cat(kept["targets"])
    return WindowStates(
        layers=layers,
        num_layers=num_layers,
        input_ids=torch.cat(kept["ids"]),
        attention_mask=torch.cat(kept["mask"]),
        targets=targets,
        scored=targets != IGNORE_INDEX,
        states=torch.cat(kept["states"]),
        final_states=torch.cat(kept["finals"]),
        top_logprobs=torch.cat(kept["logp"]),
        top_ids=torch.cat(kept["top"]),
        final_nll=torch.cat(kept["nll"]),
    )
