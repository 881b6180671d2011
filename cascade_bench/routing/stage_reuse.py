"""Reuse across passes over the same batches: what every routed and masked pass computes identically.

A sweep runs many passes over the same scored batches that differ only in their thresholds. Every
one of them runs stage 0 on every real token with the same layout, and its exit head (and, for a
logit-free rule, its exit rule) on all of them; a masked pass runs *every* stage on every token.
None of that depends on the thresholds, so it is computed once and kept here:

- ``states``: a stage's output (and last-layer input) over every real token of a batch, keyed by
  the stage and how its tokens were laid out; shared by every exit rule (the layers do not depend
  on the rule);
- ``heads``: the exit head's per-token results (NLL, correct, argmax, confidence) over the same
  tokens, and logit-free confidences, per exit rule (``for_rule``).

What a stage computes for a *subset* of tokens (the continuing tokens after an exit) is never
kept: under the compaction rule their states depend on which tokens continue, so those stages run
for real in every pass. A pass reads and writes only entries made by the very call it would make
(same stage, inputs, layout, positions and head chunking), so a pass with reuse gives the same
bits as one without; the tests compare them field for field.

Memory: entries are kept while their total stays within ``limit_bytes``; past it, passes compute
what is missing as if there were no reuse (same results, less saved) and ``summary`` says how much
was refused. Only untimed, uncounted passes read: a counted pass must count every FLOP it runs
(it may keep what it computes: ``reading=False``) and a timed pass must run what it times, so
``forward_cascade`` refuses a reading reuse with a probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

#: Default bound on what a sweep keeps (bytes): 2 GiB.
REUSE_LIMIT_BYTES = 2 << 30


def _bytes(value) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(_bytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


@dataclass
class ReuseBudget:
    """Bytes kept so far against ``limit_bytes``, and what was refused past it."""

    limit_bytes: int = REUSE_LIMIT_BYTES
    kept_bytes: int = 0
    refused_bytes: int = 0
    hits: int = 0
    misses: int = 0

    def admit(self, value) -> bool:
        size = _bytes(value)
        if self.kept_bytes + size > self.limit_bytes:
            self.refused_bytes += size
            return False
        self.kept_bytes += size
        return True


@dataclass
class BatchReuse:
    """One batch's kept results: ``states`` shared by every exit rule, ``heads`` of one rule.
    ``batch`` holds the token ids, real tokens and targets they belong to, set by the first pass
    (``bind``): a pass over another batch is refused."""

    batch: dict
    states: dict
    heads: dict
    budget: ReuseBudget
    #: False: keep what the pass computes, read nothing (a counted pass: it must run every op it counts)
    reading: bool = True

    def bind(self, **tensors: Tensor) -> None:
        """Check (or, first, record) that the pass runs on the batch the entries belong to."""
        if not self.batch:
            self.batch.update(tensors)
            return
        for name, given in tensors.items():
            kept = self.batch[name]
            if given.shape != kept.shape or not torch.equal(given, kept):
                raise ValueError(
                    f"stage reuse was given other {name} than the batch its entries belong to (shape "
                    f"{tuple(given.shape)} vs {tuple(kept.shape)}, or other values): one reuse per list of batches"
                )

    def _kept(self, table: dict, key: tuple, compute: Callable[[], object]):
        if self.reading and key in table:
            self.budget.hits += 1
            return table[key]
        self.budget.misses += 1
        value = compute()
        if key not in table and self.budget.admit(value):
            table[key] = value
        return value

    def state(self, key: tuple, compute: Callable[[], tuple]) -> tuple:
        """The stage output ``compute()`` gives for ``key`` (computed on first use)."""
        return self._kept(self.states, key, compute)

    def head(self, key: tuple, compute: Callable[[], object]):
        """The exit head's (or exit rule's) result ``compute()`` gives for ``key`` under this rule."""
        return self._kept(self.heads, key, compute)


@dataclass
class StageReuse:
    """What the passes of one sweep over one list of batches keep (see the module docstring)."""

    limit_bytes: int = REUSE_LIMIT_BYTES
    budget: ReuseBudget = field(init=False)
    _states: dict = field(default_factory=dict, init=False)
    _heads: dict = field(default_factory=dict, init=False)
    _batches: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        if isinstance(self.limit_bytes, bool) or not isinstance(self.limit_bytes, int) or self.limit_bytes < 0:
            raise ValueError(f"limit_bytes must be an int >= 0, got {self.limit_bytes!r}")
        self.budget = ReuseBudget(self.limit_bytes)

    def for_rule(self, rule: str) -> "RuleReuse":
        """The view the passes under exit rule ``rule`` read and write."""
        return RuleReuse(self, rule)

    def batch(self, rule: str, index: int, reading: bool = True, part: str = "") -> BatchReuse:
        """Batch ``index`` of the list ``part`` names ("": the scored batches) as the passes under
        ``rule`` see it (``reading=False``: a pass that only adds what it computes)."""
        return BatchReuse(
            self._batches.setdefault((part, index), {}),
            self._states.setdefault((part, index), {}),
            self._heads.setdefault((rule, part, index), {}),
            self.budget,
            reading,
        )

    def summary(self) -> dict:
        """What the reuse kept and saved, for a run's conditions."""
        b = self.budget
        return {
            "limit_bytes": b.limit_bytes,
            "kept_bytes": b.kept_bytes,
            "refused_bytes": b.refused_bytes,
            "reused_calls": b.hits,
            "computed_calls": b.misses,
        }


@dataclass(frozen=True)
class RuleReuse:
    """``StageReuse`` as the passes under one exit rule see it: ``batch(i)`` per batch."""

    owner: StageReuse
    rule: str
    part: str = ""

    def batch(self, index: int, reading: bool = True) -> BatchReuse:
        return self.owner.batch(self.rule, index, reading, self.part)

    def within(self, part: str) -> "RuleReuse":
        """The same rule's view of another list of batches (``part`` names it: risk control's halves)."""
        return RuleReuse(self.owner, self.rule, part)


def reuse_for(reuse: Optional[RuleReuse], index: int, reading: bool = True) -> Optional[BatchReuse]:
    """Batch ``index``'s reuse, or None without one."""
    return None if reuse is None else reuse.batch(index, reading)
