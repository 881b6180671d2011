"""A token-level recurrent language model: the model Lagged Cache Training is made for.

Each position carries one context vector, updated from the previous position's and the current
token: ``c_t = norm(c_{t-1} + update([c_{t-1}; embed(x_t)]))``, and the next token is predicted from
``c_t`` through a head tied to the embedding. Inference is a recurrence: position t needs c_{t-1}, so
the positions of a sequence run one after another (``contexts``).

``next_context`` takes any previous contexts, which is what lets training break the recurrence:
given a cache holding every position's context from an earlier pass, all positions of a sequence
update at once (``training.lagged_cache``). The model only computes; how it is trained lives in
``training``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RecurrentContextLM(nn.Module):
    """Context vectors of ``hidden_size`` updated by a two-layer MLP of ``inner_size`` over
    ``[previous context; token embedding]``, with a residual and a LayerNorm; logits from the
    normalised context through the embedding matrix (tied head)."""

    def __init__(self, vocab_size: int, hidden_size: int = 128, inner_size: int = 512):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("inner_size", inner_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.update = nn.Sequential(
            nn.Linear(2 * hidden_size, inner_size), nn.GELU(), nn.Linear(inner_size, hidden_size)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.head_norm = nn.LayerNorm(hidden_size)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def initial_context(self, rows: int) -> Tensor:
        """The context before the first token: zeros, (rows, hidden)."""
        return self.embedding.weight.new_zeros(rows, self.hidden_size)

    def next_context(self, previous: Tensor, ids: Tensor) -> Tensor:
        """Contexts after tokens ``ids`` (any shape S) from ``previous`` (S + (hidden,)): every
        position independently, so a whole sequence updates at once when ``previous`` is given."""
        if previous.shape != (*ids.shape, self.hidden_size):
            raise ValueError(
                f"previous contexts must have shape {(*ids.shape, self.hidden_size)} for ids of shape "
                f"{tuple(ids.shape)}, got {tuple(previous.shape)}"
            )
        return self.norm(previous + self.update(torch.cat([previous, self.embedding(ids)], dim=-1)))

    def contexts(self, ids: Tensor, start: "Tensor | None" = None) -> Tensor:
        """The recurrence itself: (R, T) ids -> (R, T, hidden) contexts, position after position,
        from ``start`` (R, hidden; default ``initial_context``)."""
        context = self.initial_context(ids.shape[0]) if start is None else start
        out = []
        for t in range(ids.shape[1]):
            context = self.next_context(context, ids[:, t])
            out.append(context)
        return torch.stack(out, dim=1)

    def logits(self, contexts: Tensor) -> Tensor:
        """Next-token logits from contexts (..., hidden) -> (..., vocab)."""
        return self.head_norm(contexts) @ self.embedding.weight.T


__all__ = ["RecurrentContextLM"]
