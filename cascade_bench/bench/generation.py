"""Decode throughput of early-exit generation against full-depth generation.

Untrained stages generate degenerate text, so thresholds calibrated on text give decode exit
ratios far from any target. The exit ratio after stage 0 is therefore forced by ``ForcedExitRate``,
an exit rule that pays the full cost of a real rule (``max_prob``: the stage's logits for every
token reaching it; ``cos_sim``: the last layer's input captured, no logits until a token exits)
and then decides by a seeded pattern that exits exactly the asked fraction. Early-exit and
full-depth generation (``method="full"``: no intermediate head) of the same prompts are timed
back to back, ``repeats`` pairs; the speedup is the median over pairs of full-depth seconds per
token over early-exit seconds per token. Hugging Face's own ``generate`` on stage 0 is timed
beside our ``generate`` with every token exiting at stage 0 (the same computation), as a check of
this package's per-step overhead.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..data.storage import write_json_atomic
from ..routing.generation import generate
from ..stages.ensemble import Ensemble
from ..stages.exits import ExitFunction, resolve_exit_function
from ..stages.llm import LLM

#: Decisions are drawn in chunks of this many: each chunk exits exactly its share, in seeded order.
CHUNK = 8


class ForcedExitRate:
    """Exit rule that exits exactly ``rate`` of the tokens it sees, at the cost of ``rule``.

    Decisions come in chunks of ``CHUNK`` consecutive tokens (one decode step of batch 8, or 8
    steps of batch 1); chunk j exits round(rate * CHUNK * (j+1)) - round(rate * CHUNK * j) of
    its tokens, at seeded random places. ``rule``'s confidence is computed for every token and
    discarded, so the rule's cost is paid (its ``needs_logits``/``needs_input_state`` carry
    over). Returns 1.0 (exit) or 0.0 (continue): use it with threshold 0.5.
    """

    def __init__(self, rate: float, rule: "str | ExitFunction" = "max_prob", seed: int = 0):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be a fraction in [0, 1], got {rate!r}")
        self.rate = float(rate)
        self.rule = resolve_exit_function(rule)
        self.needs_logits = self.rule.needs_logits
        self.needs_input_state = self.rule.needs_input_state
        self.__name__ = f"forced {self.rate:g} ({self.rule.name} cost)"
        self._generator = torch.Generator().manual_seed(seed)
        self._pattern = torch.zeros(0)
        self._chunks = 0
        self._used = 0

    def _extend(self, needed: int, device) -> None:
        chunks = []
        while (len(chunks) + self._chunks) * CHUNK < needed:
            j = self._chunks + len(chunks)
            exits = round(self.rate * CHUNK * (j + 1)) - round(self.rate * CHUNK * j)
            chunk = torch.zeros(CHUNK)
            chunk[torch.randperm(CHUNK, generator=self._generator)[:exits]] = 1.0
            chunks.append(chunk)
        self._chunks += len(chunks)
        self._pattern = torch.cat([self._pattern.to(device), torch.cat(chunks).to(device)])

    def __call__(self, h_in: Optional[Tensor], h_out: Tensor, logits: Optional[Tensor]) -> Tensor:
        self.rule(h_in, h_out, logits)  # the real rule's cost, paid and discarded
        n = h_out.shape[0]
        end = self._used + n
        if end > self._pattern.numel() or self._pattern.device != h_out.device:
            self._extend(max(end, 2 * self._pattern.numel()), h_out.device)
        decisions = self._pattern[self._used:end]
        self._used = end
        return decisions


@dataclass(frozen=True)
class GenerationBenchRow:
    """One batch size, rule and forced exit rate; times are seconds per generated token, all rows
    together (``GenerationOutput.seconds_per_token``, medians over repeats); speedup is the median
    over back-to-back pairs of full-depth time over early-exit time (= the decode throughput ratio)."""

    batch_size: int
    rule: str
    forced_rate: float
    decode_exit_ratio: float
    layer_cost: float
    seconds_per_token: float
    seconds_per_token_full: float
    speedup: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.seconds_per_token

    @property
    def tokens_per_s_full(self) -> float:
        return 1.0 / self.seconds_per_token_full


@dataclass(frozen=True)
class PeerRow:
    """Stage 0 alone: this package's ``generate`` (every token exits at stage 0) against Hugging
    Face's ``generate`` on the same model and prompts, seconds per generated token (medians)."""

    batch_size: int
    seconds_per_token: float
    seconds_per_token_hf: float


def _hf_seconds_per_token(stage, input_ids: Tensor, new_tokens: int) -> float:
    """Seconds per generated token (all rows together) of HF ``generate``, greedy, decode steps
    only: between the first and the last call of a stopping criterion (one call per step)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if input_ids.is_cuda:
                torch.cuda.synchronize(input_ids.device)
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    with torch.inference_mode():
        stage.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None, stopping_criteria=StoppingCriteriaList([Stamp()]))
    return (stamps[-1] - stamps[0]) / ((len(stamps) - 1) * input_ids.shape[0])


def bench_generation(ensemble: Ensemble, prompts: dict[int, Tensor], rates: Sequence[float] = (0.0, 0.5, 0.9),
                     rules: Sequence[str] = ("max_prob", "cos_sim"), new_tokens: int = 64, repeats: int = 7,
                     warmup: int = 1, seed: int = 0, hf_peer: bool = True) -> tuple[list[GenerationBenchRow],
                                                                                   list[PeerRow]]:
    """Time early-exit against full-depth generation (see the module docstring). ``prompts`` maps a
    batch size to its (B, P) prompt ids. Stage 0's exit function is restored afterwards."""
    if len(ensemble) < 2:
        raise ValueError(f"the generation benchmark needs at least 2 stages, got {len(ensemble)}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an int >= 2 (one decode step at least), got {new_tokens!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    first = ensemble[0]
    saved = first.exit_function
    thresholds = [0.5] + [math.inf] * (len(ensemble) - 2)
    rows, peers = [], []
    try:
        for batch, ids in prompts.items():
            def full():
                return generate(ensemble, ids, max_new_tokens=new_tokens, method="full")

            for rule in rules:
                for rate in rates:
                    first.exit_function = resolve_exit_function(ForcedExitRate(rate, rule, seed=seed))

                    def early():
                        return generate(ensemble, ids, max_new_tokens=new_tokens, thresholds=thresholds)

                    for _ in range(warmup):
                        early(), full()
                    mine, theirs, out = [], [], None
                    for _ in range(repeats):
                        out = early()
                        mine.append(out.seconds_per_token)
                        theirs.append(full().seconds_per_token)
                    rows.append(GenerationBenchRow(
                        batch_size=batch, rule=rule, forced_rate=rate,
                        decode_exit_ratio=out.exit_counts[0] / out.decode_tokens, layer_cost=out.layer_cost,
                        seconds_per_token=statistics.median(mine), seconds_per_token_full=statistics.median(theirs),
                        speedup=statistics.median(b / a for a, b in zip(mine, theirs))))
            if hf_peer and isinstance(first, LLM):  # a Block has no generate of its own
                peers.append(_peer_row(ensemble, ids, new_tokens, repeats, warmup))
    finally:
        first.exit_function = saved
    return rows, peers


def _peer_row(ensemble: Ensemble, ids: Tensor, new_tokens: int, repeats: int, warmup: int) -> PeerRow:
    """Stage 0 alone, ours (thresholds -inf: every token exits there) vs HF generate."""
    levels = [-math.inf] + [math.inf] * (len(ensemble) - 2)

    def ours() -> float:
        return generate(ensemble, ids, max_new_tokens=new_tokens, thresholds=levels).seconds_per_token

    for _ in range(warmup):
        ours(), _hf_seconds_per_token(ensemble[0], ids, new_tokens)
    mine, theirs = [], []
    for _ in range(repeats):
        mine.append(ours())
        theirs.append(_hf_seconds_per_token(ensemble[0], ids, new_tokens))
    return PeerRow(batch_size=ids.shape[0], seconds_per_token=statistics.median(mine),
                   seconds_per_token_hf=statistics.median(theirs))


def decode_checks(rows: Sequence[GenerationBenchRow], rate: float = 0.5, batch_size: int = 1,
                  min_speedup: float = 1.25) -> list[tuple[str, bool]]:
    """The decode bar (early exit at ``rate`` after stage 0 gives at least ``min_speedup`` decode
    throughput over full depth at ``batch_size``), one check per exit rule measured there."""
    return [(f"batch {r.batch_size}, {r.forced_rate:.0%} exit, {r.rule} cost: decode speedup {r.speedup:.3f} "
             f">= {min_speedup:g}", r.speedup >= min_speedup)
            for r in rows if r.batch_size == batch_size and math.isclose(r.forced_rate, rate)]


def format_generation_table(rows: Sequence[GenerationBenchRow]) -> str:
    """Markdown table of the rows."""
    lines = ["| batch | exit rule cost | forced exit after stage 0 | decode exit ratio | layer cost | "
             "ms/token | full-depth ms/token | tokens/s | full-depth tokens/s | speedup |",
             "|" + "|".join([" --- "] * 10) + "|"]
    for r in rows:
        lines.append(f"| {r.batch_size} | {r.rule} | {r.forced_rate:.0%} | {r.decode_exit_ratio:.1%} | "
                     f"{r.layer_cost:.3f} | {r.seconds_per_token * 1e3:.2f} | {r.seconds_per_token_full * 1e3:.2f} | "
                     f"{r.tokens_per_s:,.0f} | {r.tokens_per_s_full:,.0f} | {r.speedup:.3f} |")
    return "\n".join(lines)


def format_peer_table(peers: Sequence[PeerRow]) -> str:
    """Markdown table of the peer rows (time ratio > 1: this package is slower than HF)."""
    lines = ["| batch | cascade_bench generate, stage 0 only: ms/token | HF generate, stage 0: ms/token | time ratio |",
             "| --- | --- | --- | --- |"]
    for p in peers:
        lines.append(f"| {p.batch_size} | {p.seconds_per_token * 1e3:.3f} | {p.seconds_per_token_hf * 1e3:.3f} | "
                     f"{p.seconds_per_token / p.seconds_per_token_hf:.3f} |")
    return "\n".join(lines)


def write_generation_bench(rows: Sequence[GenerationBenchRow], peers: Sequence[PeerRow], checks, conditions: dict,
                           path: "Path | str") -> None:
    """Rows, peers, checks and conditions as JSON, written atomically."""
    write_json_atomic(Path(path), {
        "conditions": conditions,
        "checks": [{"check": text, "met": met} for text, met in checks],
        "rows": [{**asdict(r), "tokens_per_s": r.tokens_per_s, "tokens_per_s_full": r.tokens_per_s_full}
                 for r in rows],
        "hf_peer": [asdict(p) for p in peers]})
