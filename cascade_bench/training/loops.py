"""Training, outside the model classes: one stage (``train_llm``), hard tokens for the next stage
(``collect_hard_tokens``), and whole cascades jointly (``train_jointly``: standard and deep
supervision baselines). The staged protocols (ASHEM, LEGO) are in ``protocols.py``.

Batches are dicts: ``input_ids`` (stage 0) or ``inputs_embeds`` (later stages), ``targets``
(the token to predict at each position, -100 where not scored), and optionally
``position_ids``. Rows are left-aligned with padding after them, as in routed evaluation, so a
causal mask keeps real tokens from seeing padding and stages run with an all-ones mask.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..data.batch import IGNORE_INDEX, next_token_targets, unpack_batch
from ..routing.compaction import plan_layouts, to_dense
from ..routing.passes import forward_cascade
from ..stages.ensemble import Ensemble, evaluation_mode
from ..stages.llm import LLM


@dataclass(frozen=True)
class TrainConfig:
    """AdamW training of one stage with early stopping on a validation perplexity.

    patience: training stops after this many consecutive epochs without a new best validation
    PPL, and the best state is restored. max_steps_per_epoch: cap (None = full epoch), for quick runs.
    """

    lr: float = 1e-3
    max_epochs: int = 10
    patience: int = 1
    weight_decay: float = 0.01
    grad_clip: Optional[float] = 1.0
    seed: int = 0
    max_steps_per_epoch: Optional[int] = None

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("max_epochs", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be None or >= 1, got {self.max_steps_per_epoch!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be None or positive, got {self.grad_clip!r}")


#: Why a training run ended: patience ran out (converged), or it reached ``max_epochs`` first (cut).
STOP_REASONS = ("early stopping", "epoch cap")


@dataclass(frozen=True)
class TrainHistory:
    """Per epoch: mean training loss and validation PPL; the epoch restored (0-based); throughput;
    why training ended (``stop_reason``, one of ``STOP_REASONS``) and the limits it ran under.
    ``seconds``: wall time of the whole run, validation included. ``val_logged``: per epoch, the values
    logged beside the validation score (e.g. ``{"hard PPL": ...}``), empty dicts when none."""

    train_loss: tuple[float, ...]
    val_ppl: tuple[float, ...]
    best_epoch: int
    best_val_ppl: float
    steps: int
    train_tokens: int
    tokens_per_s: float
    stop_reason: str = "early stopping"
    max_epochs: int = 0
    patience: int = 0
    max_steps_per_epoch: Optional[int] = None
    seconds: float = math.nan
    val_logged: tuple[dict, ...] = ()

    @property
    def epochs(self) -> int:
        return len(self.val_ppl)

    @property
    def converged(self) -> bool:
        """Stopped by patience on whole epochs (not cut by the epoch cap or a step cap)."""
        return self.stop_reason == "early stopping" and self.max_steps_per_epoch is None

    def summary(self) -> dict:
        """JSON-ready: epochs run, best epoch (1-based), stop reason, limits, the PPL curve, speed."""
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch + 1,
            "best_val_ppl": self.best_val_ppl,
            "stop_reason": self.stop_reason,
            "max_epochs": self.max_epochs,
            "patience": self.patience,
            "max_steps_per_epoch": self.max_steps_per_epoch,
            "converged": self.converged,
            "val_ppl": list(self.val_ppl),
            "train_loss": list(self.train_loss),
            "steps": self.steps,
            "train_tokens_per_s": self.tokens_per_s,
            "seconds": self.seconds,
            **({"val_logged": list(self.val_logged)} if any(self.val_logged) else {}),
        }


def _stage_loss(stage: LLM, batch: dict) -> tuple[Tensor, int]:
    """Mean cross-entropy over scored positions, and how many there were."""
    ids, embeds = batch.get("input_ids"), batch.get("inputs_embeds")
    reference = ids if ids is not None else embeds
    mask = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
    out = stage(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, position_ids=batch.get("position_ids"))
    logits = stage.logits(out.hidden).float()
    targets = batch["targets"]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


class EarlyStopping:
    """The early-stopping rule every training loop here shares: a validation score (lower is better)
    that has not improved by more than ``min_delta`` for ``patience`` epochs stops training, and the
    best epoch's weights of ``modules`` are kept (copied when scored) and restored at the end."""

    def __init__(self, modules: Sequence[torch.nn.Module], patience: int, min_delta: float = 0.0):
        self.modules, self.patience, self.min_delta = list(modules), patience, min_delta
        self.best, self.best_epoch, self.waited = math.inf, -1, 0
        self.best_state: Optional[list[dict]] = None
        self.stop_reason = "epoch cap"

    def update(self, score: float, epoch: int) -> bool:
        """Record ``epoch``'s score; True when training should stop."""
        if score < self.best - self.min_delta:
            self.best, self.best_epoch, self.waited = score, epoch, 0
            self.best_state = [copy.deepcopy(module.state_dict()) for module in self.modules]
            return False
        self.waited += 1
        if self.waited >= self.patience:
            self.stop_reason = "early stopping"
            return True
        return False

    def restore(self) -> None:
        """Load the best epoch's weights (if any epoch was scored) and leave every module in eval mode."""
        if self.best_state is not None:
            for module, state in zip(self.modules, self.best_state):
                module.load_state_dict(state)
        for module in self.modules:
            module.eval()


@dataclass
class EpochStats:
    """One epoch of ``train_epochs``: the mean training loss over its scored tokens, their count, the
    optimizer steps taken and the seconds they took (validation not included)."""

    loss_sum: float = 0.0
    tokens: int = 0
    steps: int = 0
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)


def train_epochs(
    modules: Sequence[torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    epochs: Iterable[int],
    epoch_steps: Callable[[int], Iterable[Callable[[], tuple[Tensor, int]]]],
    validate: Callable[[int, EpochStats], "float | Sequence[float]"],
    stopping: EarlyStopping,
    grad_clip: Optional[float] = None,
) -> None:
    """The one step loop of every trainer here (``fit``, the memory streams, the relation benchmark).

    Each epoch of ``epochs``: ``modules`` in train mode; every step of ``epoch_steps(epoch)`` (a
    call returning the loss and how many tokens it scored) is backpropagated and taken (gradients
    clipped to ``grad_clip`` if set); then ``modules`` in eval mode, and ``validate(epoch, stats)``
    gives the score (lower is better) that ``stopping`` reads. At the end no gradient is kept and
    the best epoch's weights are restored. A stopping rule that scores parts apart
    (``exit_recipes.LayerwiseStopping``) takes a sequence of scores from ``validate``."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for epoch in epochs:
        for module in modules:
            module.train()
        stats = EpochStats()
        start = time.perf_counter()
        for step in epoch_steps(epoch):
            loss, scored = step()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
            optimizer.step()
            stats.loss_sum += float(loss.detach()) * scored
            stats.tokens += scored
            stats.steps += 1
        stats.seconds = time.perf_counter() - start
        for module in modules:
            module.eval()
        if stopping.update(validate(epoch, stats), epoch):
            break
    optimizer.zero_grad(set_to_none=True)  # no gradient outlives training (memory, and frozen stages stay clean)
    stopping.restore()


def fit(
    parameters: Sequence[torch.nn.Parameter],
    modules: Sequence[torch.nn.Module],
    epoch_batches: Callable[[int], Iterable[dict]],
    loss_fn: Callable[[dict], tuple[Tensor, int]],
    validate: Callable[[], float],
    config: TrainConfig,
    device: torch.device,
    progress: bool = True,
    desc: str = "train",
    metric: str = "PPL",
) -> TrainHistory:
    """Training with AdamW and early stopping on ``validate()`` (a PPL, or the validation loss named
    by ``metric``; lower is better) with patience, best state restored at the end (``train_epochs``).
    ``epoch_batches(epoch)`` gives that epoch's batches (already shuffled as the caller wants).
    ``validate`` may also return ``(score, {name: value})``: the named values are logged beside the
    score each epoch (``TrainHistory.val_logged``) and do not steer training."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    parameters = list(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    stopping = EarlyStopping(modules, config.patience)
    epochs: list[tuple[EpochStats, float, dict]] = []
    run_start = time.perf_counter()

    def epoch_steps(epoch: int):
        batches = list(epoch_batches(epoch))
        if config.max_steps_per_epoch is not None:
            batches = batches[: config.max_steps_per_epoch]
        for batch in tqdm(batches, desc=f"{desc} epoch {epoch + 1}", disable=not progress, leave=False):
            yield lambda batch=batch: loss_fn(_to(batch, device))

    def scored(epoch: int, stats: EpochStats) -> float:
        score = validate()
        score, logged = score if isinstance(score, tuple) else (score, {})
        epochs.append((stats, float(score), {name: float(value) for name, value in logged.items()}))
        if progress:
            shown = "".join(f" | {name} {value:.4f}" for name, value in epochs[-1][2].items())
            print(
                f"{desc} epoch {epoch + 1}: train loss {stats.mean_loss:.4f}, validation {metric} "
                f"{float(score):.4f}{shown}",
                flush=True,
            )
        return float(score)

    clip = config.grad_clip
    train_epochs(modules, optimizer, range(config.max_epochs), epoch_steps, scored, stopping, grad_clip=clip)
    elapsed = sum(stats.seconds for stats, _, _ in epochs)
    tokens = sum(stats.tokens for stats, _, _ in epochs)
    return TrainHistory(
        train_loss=tuple(stats.mean_loss for stats, _, _ in epochs),
        val_ppl=tuple(score for _, score, _ in epochs),
        best_epoch=stopping.best_epoch,
        best_val_ppl=stopping.best,
        steps=sum(stats.steps for stats, _, _ in epochs),
        train_tokens=tokens,
        tokens_per_s=tokens / elapsed if elapsed else math.nan,
        stop_reason=stopping.stop_reason,
        max_epochs=config.max_epochs,
        patience=config.patience,
        max_steps_per_epoch=config.max_steps_per_epoch,
        seconds=time.perf_counter() - run_start,
        val_logged=tuple(logged for _, _, logged in epochs),
    )


def shuffled(batches: Sequence, seed: int) -> Callable[[int], list]:
    """Per-epoch batch order, a deterministic permutation of ``batches`` for each epoch."""

    def order(epoch: int) -> list:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    return order


def train_llm(
    stage: LLM,
    train_batches: Sequence,
    validate: Callable[[], float],
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
    desc: str = "stage",
) -> TrainHistory:
    """Train one stage on its batches (see module docstring) with AdamW and early stopping on
    ``validate()``; only this stage's parameters that require grad are updated."""
    if not len(train_batches):
        raise ValueError("train_llm got no training batches")
    parameters = [p for p in stage.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the stage has no trainable parameters (all requires_grad=False)")
    return fit(
        parameters,
        [stage],
        shuffled(list(train_batches), config.seed),
        lambda batch: _stage_loss(stage, batch),
        validate,
        config,
        stage.device,
        progress,
        desc,
    )


def exit_loss(ensemble: Ensemble, layer_weights: Sequence[float]) -> Callable[[dict], tuple[Tensor, int]]:
    """Loss of a batch of ``input_ids``/``targets`` with every stage on every token (no routing):
    sum_k w_k CE(stage k's exit) / sum_k w_k. Stages after the last non-zero weight do not run."""
    weights = [float(w) for w in layer_weights]
    if len(weights) != len(ensemble) or any(w < 0 for w in weights) or not any(weights):
        raise ValueError(f"layer_weights must be {len(ensemble)} non-negative numbers, not all 0; got {weights}")
    depth = max(k for k, w in enumerate(weights) if w) + 1

    def loss_fn(batch: dict) -> tuple[Tensor, int]:
        targets = batch["targets"].reshape(-1)
        hidden, total = None, 0.0
        for stage, weight in zip(list(ensemble)[:depth], weights):
            mask = torch.ones(batch["input_ids"].shape, dtype=torch.long, device=targets.device)
            out = stage(
                input_ids=batch["input_ids"] if hidden is None else None, inputs_embeds=hidden, attention_mask=mask
            )
            hidden = out.hidden
            if weight:
                logits = stage.logits(hidden).float()
                total = total + weight * torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX
                )
        return total / sum(weights), int((targets != IGNORE_INDEX).sum())

    return loss_fn


def train_jointly(
    ensemble: Ensemble,
    train_batches: Sequence,
    validate: Callable[[], float],
    layer_weights: Sequence[float],
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
    desc: str = "joint",
) -> TrainHistory:
    """Train all stages together on every token, no routing: loss = sum_k w_k CE(stage k's exit).

    ``layer_weights`` (one per stage, LASH style): (0, ..., 0, 1) is the standard last-layer
    loss; several non-zero weights is deep supervision.
    """
    loss_fn = exit_loss(ensemble, layer_weights)
    parameters = [p for p in ensemble.parameters() if p.requires_grad]
    return fit(
        parameters,
        list(ensemble),
        shuffled(list(train_batches), config.seed),
        loss_fn,
        validate,
        config,
        ensemble.device,
        progress,
        desc,
    )


class HardTokens:
    """Training data for stage k: per source batch, the compacted sequences of the tokens that
    continued past stage k-1, with their hidden states as inputs (R, L, d) and their original next
    tokens as targets (R, L) (padding -100). Kept in memory up to ``memory_budget_bytes``, then
    spilled to ``spill_dir`` shard by shard and read back one shard at a time."""

    def __init__(self, memory_budget_bytes: int = 1 << 30, spill_dir: "Path | str | None" = None):
        self.memory_budget_bytes = memory_budget_bytes
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self.shards: list = []  # dict in memory, or Path on disk
        self.bytes_in_memory = 0
        self.num_tokens = 0
        self.flat_indices: list[Tensor] = []  # per source batch, flat indices of the collected tokens
        self.source_tokens = 0  # real tokens run through the earlier stages
        self.seconds = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Source tokens processed per second of collection."""
        return self.source_tokens / self.seconds if self.seconds else math.nan

    def _spill_path(self) -> Path:
        if self._spill_root is None:
            self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="cascade_bench_hard_")
            root = Path(self._tmp.name)
        else:
            root = self._spill_root
            root.mkdir(parents=True, exist_ok=True)
        return root / f"shard-{len(self.shards):06d}.pt"

    def add(self, shard: dict) -> None:
        size = sum(t.numel() * t.element_size() for t in shard.values())
        self.num_tokens += int((shard["targets"] != IGNORE_INDEX).sum())
        if self.bytes_in_memory + size <= self.memory_budget_bytes:
            self.shards.append(shard)
            self.bytes_in_memory += size
        else:
            path = self._spill_path()
            torch.save(shard, path)
            self.shards.append(path)

    @property
    def spilled(self) -> int:
        return sum(isinstance(s, Path) for s in self.shards)

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict:
        shard = self.shards[index]
        return torch.load(shard) if isinstance(shard, Path) else shard

    def __iter__(self) -> Iterator[dict]:
        for index in range(len(self.shards)):
            yield self[index]


def collect_hard_tokens(
    ensemble: Ensemble,
    stage_index: int,
    batches: Iterable,
    *,
    thresholds: Optional[Sequence[float]] = None,
    positions: str = "compact",
    memory_budget_bytes: int = 1 << 30,
    spill_dir: "Path | str | None" = None,
    progress: bool = False,
) -> HardTokens:
    """Run stages 0..stage_index-1 with routing (their thresholds, or ``thresholds``) over
    ``batches`` and keep, per batch, the tokens that continue past stage_index-1, compacted exactly
    as routed evaluation hands them to stage ``stage_index`` (same order, same positions)."""
    from tqdm.auto import tqdm

    if isinstance(stage_index, bool) or not isinstance(stage_index, int) or not 1 <= stage_index <= len(ensemble):
        raise ValueError(f"stage_index must be an int in [1, {len(ensemble)}], got {stage_index!r}")
    collected = HardTokens(memory_budget_bytes, spill_dir)
    if thresholds is None:
        thresholds = ensemble.thresholds[:stage_index]
    # Eval mode (as routed evaluation) and no_grad, not inference_mode: the collected states feed
    # autograd when stage k trains.
    with evaluation_mode(ensemble), torch.no_grad():
        for item in tqdm(
            batches, desc=f"collect hard tokens for stage {stage_index}", disable=not progress, leave=False
        ):
            start = time.perf_counter()
            input_ids, attention_mask, targets = unpack_batch(item)
            out = forward_cascade(
                ensemble,
                input_ids,
                attention_mask,
                targets,
                num_stages=stage_index,
                thresholds=list(thresholds),
                positions=positions,
                open_end=True,
            )
            index, state = out.continuing_index, out.continuing_state
            collected.flat_indices.append(index.cpu())
            collected.source_tokens += out.num_tokens
            if index.numel() == 0:
                collected.seconds += time.perf_counter() - start
                continue
            batch_size, seq_len = input_ids.shape
            (layout,) = plan_layouts(index, seq_len, batch_size, "padded")
            flat_targets = targets if targets is not None else next_token_targets(input_ids, attention_mask)
            flat_targets = flat_targets.to(index.device).reshape(-1)[index]
            shard = {
                "inputs_embeds": to_dense(state, layout).cpu(),
                "targets": to_dense(flat_targets, layout, fill=IGNORE_INDEX).cpu(),
            }
            if positions == "original":
                real = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(index.device)
                original = (torch.cumsum(real.long(), 1) - 1).reshape(-1)[index]
                shard["position_ids"] = to_dense(original, layout, fill=0).cpu()
            collected.add(shard)
            collected.seconds += time.perf_counter() - start
    return collected


def collect_hard_sequences(
    ensemble: Ensemble,
    stage_index: int,
    batches: Iterable,
    threshold: float,
    *,
    memory_budget_bytes: int = 1 << 30,
    spill_dir: "Path | str | None" = None,
    progress: bool = False,
) -> HardTokens:
    """Sequence-level hard examples (the ASHEM seed's): every token of every sequence runs through
    stages 0..stage_index-1 with nobody exiting; a sequence is hard when the mean confidence of
    stage stage_index-1 over its scored tokens is below ``threshold`` (the token-level threshold
    calibrated at the hard ratio), and then all its tokens, at their own positions, are kept for
    stage ``stage_index`` to train on. ``flat_indices`` holds, per source batch, the kept sequences'
    row indices; ``mean_confidences`` every sequence's mean confidence."""
    from tqdm.auto import tqdm

    if isinstance(stage_index, bool) or not isinstance(stage_index, int) or not 1 <= stage_index <= len(ensemble):
        raise ValueError(f"stage_index must be an int in [1, {len(ensemble)}], got {stage_index!r}")
    collected = HardTokens(memory_budget_bytes, spill_dir)
    collected.mean_confidences = []
    everyone = [math.inf] * stage_index
    with evaluation_mode(ensemble), torch.no_grad():
        for item in tqdm(
            batches, desc=f"collect hard sequences for stage {stage_index}", disable=not progress, leave=False
        ):
            start = time.perf_counter()
            input_ids, attention_mask, targets = unpack_batch(item)
            targets = targets if targets is not None else next_token_targets(input_ids, attention_mask)
            scored = targets != IGNORE_INDEX
            judged = forward_cascade(
                ensemble,
                input_ids,
                attention_mask,
                targets,
                method="routed",
                thresholds=everyone,
                num_stages=stage_index,
                confidence_at_last_stage=True,
            )
            confidence = judged.stage_confidence[stage_index - 1].to(scored.device)
            mean = (confidence.nan_to_num(0.0) * scored).sum(1) / scored.sum(1).clamp(min=1)
            hard = (mean < threshold) & scored.any(1)
            collected.mean_confidences.append(mean.cpu())
            collected.flat_indices.append(hard.nonzero().flatten().cpu())
            collected.source_tokens += judged.num_tokens
            if hard.any():
                out = forward_cascade(
                    ensemble,
                    input_ids,
                    attention_mask,
                    targets,
                    num_stages=stage_index,
                    thresholds=everyone,
                    open_end=True,
                )
                batch_size, seq_len = input_ids.shape
                states = out.continuing_state.new_zeros(batch_size * seq_len, out.continuing_state.shape[-1])
                states[out.continuing_index] = out.continuing_state
                states = states.view(batch_size, seq_len, -1)
                rows = hard.to(states.device)
                collected.add(
                    {
                        "inputs_embeds": states[rows].cpu(),
                        "targets": torch.where(scored, targets, IGNORE_INDEX)[hard].cpu(),
                    }
                )
            collected.seconds += time.perf_counter() - start
    return collected


def freeze(stages: Iterable[LLM]) -> None:
    """requires_grad=False on every parameter of the given stages."""
    for stage in stages:
        for parameter in stage.parameters():
            parameter.requires_grad_(False)
