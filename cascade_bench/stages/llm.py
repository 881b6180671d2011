"""LLM: one stage of a cascade, a Hugging Face causal LM wrapped by composition plus its exit rule.

Inference only: training, timing and counting live in functions outside this class.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..models.hf_compat import output_cache, with_cache
from .exits import ExitRule
from .families import config_for_layers, family_parts, register_own_families
from .stage import StageBase, StageOutput


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a real number (use math.inf for 'nobody exits'), got {threshold!r}")
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN; use math.inf (everyone continues) or -math.inf (everyone exits)")
    return threshold


def logits_at_positions(stage: nn.Module, hidden: Tensor, logits_at: Optional[Tensor]) -> Optional[Tensor]:
    """``stage.logits`` of the states (R, L, d) at the positions of the (R, L) bool mask, in row-major
    order (n, V); None without a mask."""
    if logits_at is None:
        return None
    if logits_at.dtype != torch.bool or tuple(logits_at.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"logits_at must be a bool mask of shape {tuple(hidden.shape[:2])}, got "
            f"{logits_at.dtype} {tuple(logits_at.shape)}"
        )
    return stage.logits(hidden[logits_at])


class LLM(StageBase, nn.Module):
    """A cascade stage: any ``AutoModelForCausalLM`` model, an exit rule and a threshold.

    A token that reaches this stage exits here iff ``exit_rule(h_in, h_out, logits) >= threshold``
    (the last stage of an Ensemble always exits). The stage starts in eval mode.
    """

    def __init__(
        self, model: nn.Module, exit_rule: "str | Callable | ExitRule" = "max_prob", threshold: float = math.inf
    ):
        super().__init__()
        if not isinstance(model, nn.Module) or not hasattr(model, "get_output_embeddings"):
            raise TypeError(f"LLM wraps a Hugging Face causal LM (PreTrainedModel), got {type(model).__name__}")
        if model.get_output_embeddings() is None:
            raise ValueError(f"{type(model).__name__} has no lm_head; expected a *ForCausalLM model")
        self.model = model
        self.parts = family_parts(model)
        self.exit_rule = exit_rule
        self.threshold = check_threshold(threshold)
        self.eval()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, exit_rule="max_prob", threshold: float = math.inf, **model_kwargs) -> "LLM":
        """Build a freshly initialised stage from a Hugging Face config (uses torch's current RNG)."""
        from transformers import AutoModelForCausalLM

        register_own_families()
        return cls(AutoModelForCausalLM.from_config(config, **model_kwargs), exit_rule=exit_rule, threshold=threshold)

    @classmethod
    def from_pretrained(cls, path, exit_rule="max_prob", threshold: float = math.inf, **model_kwargs) -> "LLM":
        """Load a stage from a local folder saved with ``save_pretrained`` (or a hub name when online)."""
        from transformers import AutoModelForCausalLM

        register_own_families()
        return cls(AutoModelForCausalLM.from_pretrained(path, **model_kwargs), exit_rule=exit_rule, threshold=threshold)

    def new_stage_after(self, num_layers: int, exit_rule) -> "LLM":
        """A freshly initialised LLM of ``num_layers`` layers from this stage's config (torch's current
        RNG), on this stage's device and dtype (what ``Ensemble.extend`` appends)."""
        config = config_for_layers(self.config, 0, num_layers)
        return LLM.from_config(config, exit_rule=exit_rule).to(device=self.device, dtype=self.dtype)

    # -- standard config names ------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def head_macs_per_token(self) -> int:
        """Multiply-adds of this stage's exit head (``lm_head``) per token whose logits it computes."""
        weight = self.lm_head.weight
        return int(weight.shape[0] * weight.shape[1])

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder layers (shared with the wrapped model)."""
        return self.parts.layers

    # -- inference ------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        capture_input_state: bool = False,
        logits_at: Optional[Tensor] = None,
        cache=None,
        use_cache: bool = False,
    ) -> StageOutput:
        """Run the stage on token ids (R, L) or hidden states (R, L, d).

        attention_mask: (R, L), 1 = real token. position_ids: (R, L). Returns final hidden states
        (R, L, d), if ``capture_input_state`` the input of the last decoder layer (R, L, d), and
        logits only at the positions of the (R, L) bool mask ``logits_at`` (none by default).
        ``cache`` / ``use_cache``: a Hugging Face cache to attend over and extend (generation); the
        extended cache is returned in ``cache``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        captured: list[Tensor] = []
        handle = None
        if capture_input_state:

            def grab(_module, args, kwargs):
                captured.append(args[0] if args else kwargs["hidden_states"])

            handle = self.parts.layers[-1].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = self.parts.base_model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **with_cache(cache),
            )
        finally:
            if handle is not None:
                handle.remove()
        hidden = out.last_hidden_state
        return StageOutput(
            hidden=hidden,
            input_state=captured[0] if captured else None,
            logits=logits_at_positions(self, hidden, logits_at),
            cache=output_cache(out) if use_cache else None,
        )

    def logits(self, hidden: Tensor) -> Tensor:
        """Vocabulary logits (..., V) for the given final hidden states (..., d)."""
        return self.lm_head(hidden)

    def extra_repr(self) -> str:
        return (
            f"family={self.config.model_type}, layers={self.num_layers}, hidden={self.hidden_size}, "
            f"vocab={self.vocab_size}, exit_rule={self.exit_rule.name}, threshold={self.threshold}"
        )
