"""Test helpers: tiny from_config cascades of every supported family, real-text token batches,
and a scripted exit rule."""

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


def tiny_ensemble(preset: str, layers=(2, 2), exit_rule="max_prob", seed=0, kind: str = "llm"):
    """A tiny cascade: one model per stage (``kind="llm"``) or one model cut into blocks."""
    build = build_ensemble if kind == "llm" else build_blocks
    return build(preset, layers, exit_rule=exit_rule, seed=seed).eval()


class ScriptedExit:
    """A test exit rule with scripted per-token confidences.

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
    (exit rule, the decisions actually scripted (B, T) bool).
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


class HostTensorMixups:
    """Catches on the CPU what fails on a GPU: a tensor made on the default device (a factory call
    such as ``torch.eye(n)`` without ``device=``, or a batch tensor marked with :meth:`mark`) meeting,
    in one op, a tensor that lives with the model. On a CUDA machine that op raises "Expected all
    tensors to be on the same device"; here everything is on the CPU, so this mode tags host-made
    tensors (tags follow through ops on host tensors only; ``.to(device)`` clears them) and raises
    on the first op that mixes a tagged and an untagged tensor (0-dim tensors mix freely on CUDA too;
    a device tensor indexed by a host index is allowed, as on CUDA). Use as a context manager."""

    FACTORIES = (
        "eye",
        "full",
        "zeros",
        "ones",
        "arange",
        "tensor",
        "empty",
        "linspace",
        "randn",
        "rand",
        "randint",
        "as_tensor",
        "randperm",
    )

    def __init__(self):
        from torch.overrides import TorchFunctionMode

        helper = self

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return helper._handle(func, args, kwargs or {})

        self._mode = _Mode()
        self._factories = {getattr(torch, name) for name in self.FACTORIES}

    @staticmethod
    def mark(tensor: torch.Tensor) -> torch.Tensor:
        """Tag ``tensor`` as living on the host (a batch from a data loader)."""
        tensor._on_host = True
        return tensor

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    @staticmethod
    def _tensors(value) -> list:
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, (list, tuple)):
            return [t for item in value for t in HostTensorMixups._tensors(item)]
        if isinstance(value, dict):
            return [t for item in value.values() for t in HostTensorMixups._tensors(item)]
        return []

    def _handle(self, func, args, kwargs):
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if func in self._factories:
            if kwargs.get("device") is None:
                for tensor in self._tensors(out):
                    self.mark(tensor)
            return out
        inputs = [t for t in self._tensors(args) + self._tensors(kwargs) if t.dim() > 0]
        if name in ("to", "cuda", "cpu"):
            moved = (
                name != "to"
                or any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:])
                or "device" in kwargs
            )
            if not moved and getattr(args[0], "_on_host", False):
                for tensor in self._tensors(out):
                    self.mark(tensor)
            elif moved and out is args[0] and getattr(out, "_on_host", False):
                return out.view_as(out)  # on a GPU this is a copy on the device: untagged
            return out
        if name in ("copy_", "__get__", "__set__", "detach", "requires_grad_") or not inputs:
            return out
        host = [getattr(t, "_on_host", False) for t in inputs]
        if name == "__getitem__" and not host[0]:
            return out  # a device tensor indexed by a host index: allowed on CUDA
        if any(host) and not all(host):
            shapes = [(tuple(t.shape), "host" if h else "device") for t, h in zip(inputs, host)]
            raise RuntimeError(f"device mix-up in {name}: {shapes} (a tensor made without device= meets the model's)")
        if inputs and all(host):
            for tensor in self._tensors(out):
                self.mark(tensor)
        return out
