"""Exit rules with parameters of their own: a learned exit classifier and cheap max-prob from a reduced head.

Both are modules with the exit-function signature ``confidence = rule(h_in, h_out, logits)`` that
need **no logits**: a stage using one computes its ``lm_head`` only for the tokens that exit there.

- ``ExitClassifier`` (CALM's learned early-exit classifier): a linear probe or one hidden layer on
  the stage's output state (optionally concatenated with the input state of its last layer); its
  sigmoid is the confidence. Trained outside this class (``training.exit_classifier``).
- ``ReducedHeadMaxProb``: the softmax maximum of approximate logits, from a rank-r factorisation
  of ``lm_head`` (SVD; ``r*(d+V)`` MACs per token) or from the rows of a candidate vocabulary (the K
  most frequent ids; ``K*d`` MACs). An approximation of ``max_prob``: exact at r = min(d, V) or K = V.

Rules are named by a spec string whose kind is one of ``rule_specs.RULE_KINDS`` (``untrained_rule``
turns a spec into a rule, ``rule_from_spec`` a saved rule's shape into a module).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .blocks import Block
from .rule_specs import BUILTIN, CLASSIFIER, CLASSIFIER_TARGETS, LOW_RANK_HEAD, RULE_KINDS, parse_rule_spec


class ExitClassifier(nn.Module):
    """p(exiting here is safe) from the stage's output state (d) or [input state, output state] (2d).

    hidden_units = 0: a linear probe (d_in MACs per token); > 0: Linear, GELU, Linear
    (d_in*h + h MACs). target: what it was trained to predict (``CLASSIFIER_TARGETS``), kept for the
    record. forward returns (N,) float32 probabilities.
    """

    needs_logits = False

    def __init__(
        self, hidden_size: int, hidden_units: int = 0, use_input_state: bool = False, target: str = "consistency"
    ):
        super().__init__()
        for what, value in (("hidden_size", hidden_size), ("hidden_units", hidden_units)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if what == "hidden_size" else 0):
                raise ValueError(
                    f"ExitClassifier {what} must be an int >= {1 if what == 'hidden_size' else 0}, got {value!r}"
                )
        if target not in CLASSIFIER_TARGETS:
            raise ValueError(f"ExitClassifier target must be one of {CLASSIFIER_TARGETS}, got {target!r}")
        self.hidden_size, self.hidden_units = hidden_size, hidden_units
        self.use_input_state, self.target = bool(use_input_state), target
        d_in = hidden_size * (2 if use_input_state else 1)
        self.net = (
            nn.Linear(d_in, 1)
            if hidden_units == 0
            else nn.Sequential(nn.Linear(d_in, hidden_units), nn.GELU(), nn.Linear(hidden_units, 1))
        )
        self.rule_name = "classifier" if hidden_units == 0 else "classifier-mlp"

    @property
    def needs_input_state(self) -> bool:
        return self.use_input_state

    def macs_per_token(self) -> int:
        d_in = self.hidden_size * (2 if self.use_input_state else 1)
        return d_in if self.hidden_units == 0 else d_in * self.hidden_units + self.hidden_units

    def logit(self, h_in: Optional[Tensor], h_out: Tensor) -> Tensor:
        """(N,) pre-sigmoid score, in the weights' dtype (what training's BCE reads)."""
        features = torch.cat([h_in, h_out], dim=-1) if self.use_input_state else h_out
        return self.net(features.to(self.net_dtype)).squeeze(-1)

    @property
    def net_dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def forward(self, h_in: Optional[Tensor], h_out: Tensor, logits=None) -> Tensor:
        return torch.sigmoid(self.logit(h_in, h_out).float())

    def spec(self) -> dict:
        return {
            "kind": "classifier",
            "hidden_size": self.hidden_size,
            "hidden_units": self.hidden_units,
            "use_input_state": self.use_input_state,
            "target": self.target,
        }


class ReducedHeadMaxProb(nn.Module):
    """Softmax maximum of approximate logits ``up(down(norm(translator(h_out))))`` over the reduced
    vocabulary: the stage's own exit head with its ``lm_head`` replaced by a reduced one.

    down: Linear(d, r) or None (candidate vocabulary); up: Linear(r or d, V') with V' = V (low rank)
    or K (candidates). norm: a Block's final norm (its residual stream is not normalised), None for
    an LLM. translator: a translator-head Block's ``Translator`` (None otherwise). Both are held as
    plain references (the stage's own modules, not part of this rule's weights).
    """

    needs_logits = False
    needs_input_state = False

    def __init__(
        self,
        up: nn.Linear,
        down: Optional[nn.Linear] = None,
        norm: Optional[nn.Module] = None,
        rule_name: str = "reduced",
        translator: Optional[nn.Module] = None,
    ):
        super().__init__()
        self.down, self.up = down, up
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "translator", translator)
        self.rule_name = rule_name

    def macs_per_token(self) -> int:
        """Multiply-adds per token: the translator's (if any), then the reduced head's."""
        down = 0 if self.down is None else self.down.in_features * self.down.out_features
        translator = 0 if self.translator is None else self.translator.macs_per_token
        return translator + down + self.up.in_features * self.up.out_features

    def forward(self, h_in, h_out: Tensor, logits=None) -> Tensor:
        x = h_out if self.translator is None else self.translator(h_out)
        x = x if self.norm is None else self.norm(x)
        if self.down is not None:
            x = self.down(x)
        z = self.up(x).float()
        return torch.exp(z.amax(dim=-1) - torch.logsumexp(z, dim=-1))

    def spec(self) -> dict:
        kind, size = self.rule_name.split(":")
        return {
            "kind": kind,
            "size": int(size),
            "hidden_size": self.up.in_features if self.down is None else self.down.in_features,
            "vocab_size": self.up.out_features if kind == "lowrank" else None,
            "has_bias": self.up.bias is not None,
        }


def head_parts(stage: nn.Module) -> tuple[Optional[nn.Module], Optional[nn.Module], nn.Linear]:
    """(translator or None, norm or None, lm_head): what a stage's exit head applies, in order. A
    Block's exit head is [translator +] norm + lm_head on the residual stream; an LLM's hidden state
    is already normalised."""
    if isinstance(stage, Block):
        return stage.head.translator, stage.head.norm, stage.head.lm_head
    return None, None, stage.lm_head


def low_rank_max_prob(stage: nn.Module, rank: int) -> ReducedHeadMaxProb:
    """Cheap max-prob from the best rank-``rank`` approximation of the stage's lm_head (SVD in float64)."""
    translator, norm, head = head_parts(stage)
    vocab, hidden = head.weight.shape
    _check_size("rank", rank, min(vocab, hidden))
    u, s, vh = torch.linalg.svd(head.weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    down = nn.Linear(hidden, rank, bias=False)
    up = nn.Linear(rank, vocab, bias=head.bias is not None)
    with torch.no_grad():
        down.weight.copy_((root[:, None] * vh[:rank]).to(down.weight.dtype))
        up.weight.copy_((u[:, :rank] * root[None, :]).to(up.weight.dtype))
        if head.bias is not None:
            up.bias.copy_(head.bias.detach())
    rule = ReducedHeadMaxProb(up, down, norm, rule_name=f"lowrank:{rank}", translator=translator)
    return rule.to(device=head.weight.device, dtype=head.weight.dtype)


def top_k_max_prob(stage: nn.Module, candidate_ids: Sequence[int] | Tensor) -> ReducedHeadMaxProb:
    """Cheap max-prob over a candidate vocabulary: the lm_head rows of ``candidate_ids`` (e.g. the K
    most frequent ids of the training split, ``data.batch.most_frequent_ids``)."""
    translator, norm, head = head_parts(stage)
    vocab, hidden = head.weight.shape
    ids = torch.as_tensor(candidate_ids, dtype=torch.long).flatten().cpu()
    _check_size("number of candidate ids", int(ids.numel()), vocab)
    if ids.unique().numel() != ids.numel() or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f"candidate ids must be distinct ids in [0, {vocab}), got {ids.numel()} ids in "
            f"[{int(ids.min())}, {int(ids.max())}] with {ids.numel() - ids.unique().numel()} repeats"
        )
    up = nn.Linear(hidden, ids.numel(), bias=head.bias is not None)
    with torch.no_grad():
        up.weight.copy_(head.weight.detach()[ids.to(head.weight.device)].to(up.weight.dtype))
        if head.bias is not None:
            up.bias.copy_(head.bias.detach()[ids.to(head.weight.device)])
    rule = ReducedHeadMaxProb(up, None, norm, rule_name=f"topk:{ids.numel()}", translator=translator)
    return rule.to(device=head.weight.device, dtype=head.weight.dtype)


def _check_size(what: str, value, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"{what} must be an int in [1, {upper}], got {value!r}")


def untrained_rule(spec: str, stage: nn.Module, candidate_ids: Optional[Tensor] = None) -> "str | nn.Module":
    """The exit rule ``spec`` for ``stage`` before any training, the one place a spec becomes a rule:
    a built-in rule's name; a fresh classifier (its random initial weights: train it with
    ``training.exit_classifier``) on the stage's device and dtype; or a reduced head cut from the
    stage's own (``lowrank:R``; ``topk:K`` from the first K of ``candidate_ids``, default ids 0..K-1)."""
    kind, size = parse_rule_spec(spec)
    if kind.family == BUILTIN:
        return kind.name
    if kind.family == CLASSIFIER:
        return ExitClassifier(stage.hidden_size, kind.hidden_units).to(device=stage.device, dtype=stage.dtype)
    if kind.family == LOW_RANK_HEAD:
        return low_rank_max_prob(stage, size)
    return top_k_max_prob(stage, candidate_ids[:size] if candidate_ids is not None else torch.arange(size))


def rule_from_spec(spec: dict, stage: nn.Module) -> nn.Module:
    """An untrained rule module of the saved shape (``ExitClassifier.spec`` / ``ReducedHeadMaxProb.spec``),
    on the stage's device and dtype, ready for ``load_state_dict``."""
    translator, norm, head = head_parts(stage)
    kind = RULE_KINDS.get(spec["kind"])
    if kind is None or kind.family == BUILTIN:
        saved = [name for name, k in RULE_KINDS.items() if k.family != BUILTIN and not k.hidden_units]
        raise ValueError(f"unknown saved exit rule kind {spec['kind']!r}; expected one of {saved}")
    if kind.family == CLASSIFIER:
        rule = ExitClassifier(spec["hidden_size"], spec["hidden_units"], spec["use_input_state"], spec["target"])
    else:
        hidden, size, bias = spec["hidden_size"], spec["size"], spec["has_bias"]
        low_rank = kind.family == LOW_RANK_HEAD
        down = nn.Linear(hidden, size, bias=False) if low_rank else None
        up = nn.Linear(size, spec["vocab_size"], bias=bias) if low_rank else nn.Linear(hidden, size, bias=bias)
        rule = ReducedHeadMaxProb(up, down, norm, rule_name=f"{kind.name}:{size}", translator=translator)
    return rule.to(device=head.weight.device, dtype=head.weight.dtype)
