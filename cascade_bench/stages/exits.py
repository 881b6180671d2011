"""Exit rules: per-token confidence, higher = easier (docs/design.md section 1).

Every exit rule has the signature ``confidence = fn(h_in, h_out, logits)``:

- ``h_in``  (N, d): hidden state entering the stage's last layer (CASCADE's
  ``hidden_history[-2]``), or ``None`` when the function does not need it;
- ``h_out`` (N, d): the stage's output hidden state (what its ``lm_head`` sees);
- ``logits`` (N, V): the stage's logits, or ``None`` when the function needs none;
- returns (N,) float32.

All built-ins work in float32 and never materialise a softmax copy they don't
need: ``max_prob`` and ``margin`` use ``exp(logit - logsumexp)`` on one or two
values per token. The built-ins also accept a precomputed ``log_normalizer``
(the logsumexp per token) and ``max_logit``, so the router, which needs both
for the NLL and argmax anyway, does not make more passes over the (N, V) logits.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn


def _log_normalizer(logits: Tensor, log_normalizer: Optional[Tensor]) -> Tensor:
    if log_normalizer is not None:
        return log_normalizer
    return torch.logsumexp(logits.float(), dim=-1)


def max_prob(
    h_in, h_out, logits: Tensor, log_normalizer: Optional[Tensor] = None, max_logit: Optional[Tensor] = None
) -> Tensor:
    """Softmax maximum per token (LEGO / ASHEM): exp(max logit - logsumexp). (N,) float32."""
    lse = _log_normalizer(logits, log_normalizer)
    top = max_logit if max_logit is not None else logits.amax(dim=-1)
    return torch.exp(top.float() - lse)


def margin(h_in, h_out, logits: Tensor, log_normalizer: Optional[Tensor] = None, **_unused) -> Tensor:
    """Top-1 minus top-2 probability per token. (N,) float32."""
    if logits.shape[-1] < 2:
        raise ValueError(f"margin needs a vocabulary of at least 2 tokens, got logits of shape {tuple(logits.shape)}")
    lse = _log_normalizer(logits, log_normalizer)
    top2 = logits.topk(2, dim=-1).values.float()
    return torch.exp(top2[:, 0] - lse) - torch.exp(top2[:, 1] - lse)


def neg_entropy(h_in, h_out, logits: Tensor, log_normalizer: Optional[Tensor] = None, **_unused) -> Tensor:
    """Negative entropy of the next-token distribution, sum_v p_v log p_v (<= 0). (N,) float32."""
    lse = _log_normalizer(logits, log_normalizer)
    log_p = logits.float() - lse[:, None]
    return (log_p.exp() * log_p).sum(dim=-1)


def cos_sim(h_in: Tensor, h_out: Tensor, logits=None) -> Tensor:
    """Cosine between the state entering the stage's last layer and the stage output (CASCADE, CALM
    "state saturation"): a token the last layer changed little is easy. Needs no logits. (N,) float32."""
    return torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)


BUILTIN_EXIT_RULES: dict[str, Callable] = {
    "max_prob": max_prob,
    "cos_sim": cos_sim,
    "margin": margin,
    "neg_entropy": neg_entropy,
}
# What each built-in needs, declared on the function as a user's callable declares it (``exit_rule``
# reads these attributes): cos_sim reads the two states and no logits; the others the logits alone.
for _fn, _logits, _input_state in (
    (max_prob, True, False),
    (margin, True, False),
    (neg_entropy, True, False),
    (cos_sim, False, True),
):
    _fn.needs_logits, _fn.needs_input_state = _logits, _input_state  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ExitRule:
    """An exit rule plus what it needs, resolved once (not per call).

    ``needs_logits``: the stage must compute logits for every token that reaches it
    before deciding; if False, logits are computed only for tokens that exit there.
    ``needs_input_state``: the stage must capture the input of its last layer.
    ``macs_per_token``: multiply-adds the rule itself spends per token it decides on (a probe's or a
    reduced head's matmuls; 0 for the elementwise built-ins), for the analytic cost model.
    """

    name: str
    fn: Callable
    needs_logits: bool
    needs_input_state: bool
    accepts_log_normalizer: bool
    macs_per_token: int = 0

    @property
    def module(self) -> Optional[nn.Module]:
        """The rule's own module (a learned classifier, a reduced head), or None for a plain function."""
        return self.fn if isinstance(self.fn, nn.Module) else None

    def __call__(
        self,
        h_in: Optional[Tensor],
        h_out: Tensor,
        logits: Optional[Tensor],
        log_normalizer: Optional[Tensor] = None,
        max_logit: Optional[Tensor] = None,
    ) -> Tensor:
        if self.accepts_log_normalizer:
            confidence = self.fn(h_in, h_out, logits, log_normalizer=log_normalizer, max_logit=max_logit)
        else:
            confidence = self.fn(h_in, h_out, logits)
        if not isinstance(confidence, Tensor) or confidence.shape != h_out.shape[:1]:
            got = tuple(confidence.shape) if isinstance(confidence, Tensor) else type(confidence).__name__
            raise ValueError(
                f"exit rule {self.name!r} must return one confidence per token, shape ({h_out.shape[0]},), got {got}"  # noqa: E501
            )
        return confidence.float()


def resolve_exit_rule(exit_rule: "str | Callable | ExitRule") -> ExitRule:
    """Turn a built-in name, a callable ``fn(h_in, h_out, logits)`` or an ExitRule into an ExitRule.

    A user callable is assumed to need logits and the input state unless it carries the attributes
    ``needs_logits = False`` / ``needs_input_state = False``; one with a ``macs_per_token()`` method
    (the rule modules in ``exit_rules``) reports its own cost.
    """
    if isinstance(exit_rule, ExitRule):
        return exit_rule
    if isinstance(exit_rule, str):
        if exit_rule not in BUILTIN_EXIT_RULES:
            raise ValueError(
                f"unknown exit rule {exit_rule!r}; expected one of {sorted(BUILTIN_EXIT_RULES)} or a callable"
            )
        fn = BUILTIN_EXIT_RULES[exit_rule]
        name = exit_rule
    elif callable(exit_rule):
        fn = exit_rule
        name = getattr(exit_rule, "rule_name", None) or getattr(exit_rule, "__name__", type(exit_rule).__name__)
    else:
        raise TypeError(
            f"exit_rule must be a name in {sorted(BUILTIN_EXIT_RULES)} or a callable "
            f"fn(h_in, h_out, logits), got {type(exit_rule).__name__}"
        )
    needs_logits = bool(getattr(fn, "needs_logits", True))
    needs_input_state = bool(getattr(fn, "needs_input_state", True))
    try:
        parameters = inspect.signature(fn).parameters
        accepts = "log_normalizer" in parameters and (
            "max_logit" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        )
    except (TypeError, ValueError):
        accepts = False
    macs = int(fn.macs_per_token()) if callable(getattr(fn, "macs_per_token", None)) else 0
    return ExitRule(
        name=name,
        fn=fn,
        needs_logits=needs_logits,
        needs_input_state=needs_input_state,
        accepts_log_normalizer=accepts,
        macs_per_token=macs,
    )


class HoldsExitRule:
    """Mixin for stage modules: ``exit_rule`` resolves what it is given, and a rule with its own
    module (``ExitRule.module``) is registered as the submodule ``exit_rule``, so it moves with the
    stage's ``.to()`` and shows in its parameters. Assign a name, a callable, a rule module or an
    ExitRule."""

    @property
    def exit_rule(self) -> ExitRule:
        return self.__dict__["_exit_rule"]

    def __setattr__(self, name, value):
        if name != "exit_rule":
            super().__setattr__(name, value)
            return
        resolved = resolve_exit_rule(value)
        self.__dict__["_exit_rule"] = resolved
        if resolved.module is not None:
            super().__setattr__("exit_rule", resolved.module)
        elif "exit_rule" in self._modules:
            del self._modules["exit_rule"]
