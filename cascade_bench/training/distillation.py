"""A draft model for a real model: a few of its first layers, distilled from it on offline text.

The draft shares the teacher's tokenizer and ids, so it can propose tokens that the teacher
verifies (``routing.draft_verify``, and Hugging Face's ``assistant_model``). It starts as a copy of
the teacher's embedding, first ``layers`` decoder layers, final norm and head (a plain Hugging
Face model of the same family), and every weight is trained to match the teacher's next-token
distribution: cross-entropy to the teacher's top-``top_k`` probabilities (renormalised over
those ids), which is the KL to them up to the teacher's entropy.

- Teacher targets are computed once per (teacher, text, top_k) and cached (``teacher_targets``).
- Optional hard-token weighting (the seeds' protocols train later stages on hard tokens): a
  token where the draft's top-1 differs from the teacher's weighs ``1 + hard_weight``.
- Training stops by early stopping on the validation disagreement (1 - top-1 agreement with the
  teacher on held-out windows) with ``patience`` checks, each after ``steps_per_check`` steps, or
  when ``seconds`` run out (then the record says it was cut, not converged).
- The draft's decode vocabulary: the ``vocabulary`` most frequent ids of its training text
  (``draft.json``), so that a decoder may compute only those rows of the head.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..stages.families import config_for_layers
from ..stages.llm import LLM
from .draft_config import DraftConfig
from .loops import EarlyStopping, EpochStats, train_epochs

#: The draft folder's own record beside the Hugging Face files.
DRAFT_RECORD = "draft.json"


def draft_from_teacher(teacher: LLM, layers: int) -> LLM:
    """A new model of the teacher's family: its embedding, first ``layers`` layers, norm and head."""
    from transformers import AutoModelForCausalLM

    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers < teacher.num_layers:
        raise ValueError(f"draft layers must be an int in [1, {teacher.num_layers - 1}], got {layers!r}")
    config = config_for_layers(teacher.config, 0, layers)
    model = AutoModelForCausalLM.from_config(config).to(dtype=teacher.dtype)
    own = model.state_dict()
    copied = {name: value for name, value in teacher.model.state_dict().items() if name in own}
    missing = [name for name in own if name not in copied]
    if missing:
        raise ValueError(f"the draft's weights {missing[:3]} have no counterpart in the teacher")
    model.load_state_dict(copied)
    return LLM(model, exit_rule="max_prob").to(teacher.device)


def windows_of(stream: Tensor, window: int, limit: int) -> Tensor:
    """Disjoint (W, window + 1) rows of ``stream`` (N,): ``window`` inputs and the token after them,
    covering at most the first ``limit`` input tokens."""
    usable = min(stream.numel() - 1, limit)
    count = usable // window
    if count < 1:
        raise ValueError(f"the text gives {stream.numel()} tokens, fewer than one window of {window + 1}")
    return torch.stack([stream[i * window : (i + 1) * window + 1] for i in range(count)])


def _digest(teacher_fingerprint: str, windows: Tensor, top_k: int) -> str:
    digest = hashlib.sha256(f"{teacher_fingerprint}|{top_k}|{tuple(windows.shape)}".encode())
    digest.update(windows.numpy().tobytes())
    return digest.hexdigest()[:16]


def teacher_targets(
    teacher: LLM,
    windows: Tensor,
    top_k: int,
    cache_dir: Optional[Path] = None,
    fingerprint: str = "",
    batch_size: int = 8,
) -> tuple[Tensor, Tensor]:
    """(logits (W, T, k) float16, ids (W, T, k) int32): the teacher's top-``top_k`` next-token logits
    at every input position of ``windows`` (W, T + 1), cached under ``cache_dir`` by content."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"teacher-{_digest(fingerprint, windows, top_k)}.pt"
        if path.is_file():
            stored = torch.load(path)
            return stored["logits"], stored["ids"]
    inputs = windows[:, :-1]
    values, ids = [], []
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], batch_size):
            chunk = inputs[start : start + batch_size].to(teacher.device)
            hidden = teacher(input_ids=chunk, attention_mask=torch.ones_like(chunk)).hidden
            top = teacher.logits(hidden).float().topk(top_k, dim=-1)
            values.append(top.values.half().cpu())
            ids.append(top.indices.int().cpu())
    logits, index = torch.cat(values), torch.cat(ids)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save({"logits": logits, "ids": index}, partial)
        partial.replace(path)
    return logits, index


def distillation_loss(
    draft: LLM, inputs: Tensor, target_logits: Tensor, target_ids: Tensor, hard_weight: float = 0.0
) -> tuple[Tensor, int]:
    """Mean over tokens of -sum_i p_teacher(i) log p_draft(i) over the teacher's top-k ids."""
    hidden = draft(input_ids=inputs, attention_mask=torch.ones_like(inputs)).hidden
    log_q = draft.logits(hidden).float().log_softmax(-1)
    p = target_logits.float().softmax(-1)
    per_token = -(p * log_q.gather(-1, target_ids.long())).sum(-1)
    if hard_weight:
        wrong = log_q.argmax(-1) != target_ids[..., 0].long()
        weight = 1.0 + hard_weight * wrong.float()
        return (per_token * weight).sum() / weight.sum(), per_token.numel()
    return per_token.mean(), per_token.numel()


def agreement(draft: LLM, windows: Tensor, target_ids: Tensor, batch_size: int = 8) -> float:
    """Share of positions where the draft's top-1 equals the teacher's."""
    same = total = 0
    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            inputs = windows[start : start + batch_size, :-1].to(draft.device)
            hidden = draft(input_ids=inputs, attention_mask=torch.ones_like(inputs)).hidden
            top1 = draft.logits(hidden).argmax(-1).cpu()
            same += int((top1 == target_ids[start : start + batch_size, :, 0].long()).sum())
            total += top1.numel()
    return same / total


def frequent_ids(stream: Tensor, count: int, vocab_size: int) -> list[int]:
    """The ``count`` most frequent ids of ``stream`` (ties: the lower id), sorted; all ids if 0."""
    if count == 0 or count >= vocab_size:
        return list(range(vocab_size))
    counts = torch.bincount(stream, minlength=vocab_size)
    order = torch.argsort(-counts, stable=True)  # stable: equal counts keep id order
    return sorted(order[:count].tolist())


@dataclass(frozen=True)
class DraftHistory:
    """One distillation run: per check the mean training loss and validation agreement, the check
    kept, why it stopped, tokens seen and wall seconds (teacher labelling and training apart)."""

    train_loss: tuple[float, ...]
    val_agreement: tuple[float, ...]
    best_check: int
    stop_reason: str
    train_tokens: int
    teacher_seconds: float
    train_seconds: float
    start_agreement: float

    @property
    def converged(self) -> bool:
        return self.stop_reason == "early stopping"

    def summary(self) -> dict:
        return {**asdict(self), "converged": self.converged, "best_agreement": self.val_agreement[self.best_check]}


def distill(
    draft: LLM,
    train: Tensor,
    train_targets: tuple[Tensor, Tensor],
    validation: Tensor,
    validation_targets: tuple[Tensor, Tensor],
    config: DraftConfig,
    progress: bool = True,
) -> DraftHistory:
    """Train every weight of ``draft`` on ``train`` windows (W, T + 1) against the teacher's top-k
    targets, early stopping on validation disagreement (see the module docstring)."""
    torch.manual_seed(config.seed)
    parameters = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    stopping = EarlyStopping([draft], config.patience)
    logits, ids = train_targets
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    losses, agreements = [], []
    start_agreement = agreement(draft, validation, validation_targets[1], config.batch_size)
    deadline = time.perf_counter() + config.seconds
    cut = {"by_time": False}

    def next_batch() -> Tensor:
        nonlocal order
        if len(order) < config.batch_size:
            order += torch.randperm(train.shape[0], generator=generator).tolist()
        picked, order = order[: config.batch_size], order[config.batch_size :]
        return torch.tensor(picked)

    def checks():
        check = 0
        while True:
            if time.perf_counter() >= deadline:
                cut["by_time"] = True
                return
            yield check
            check += 1

    def steps(_check: int):
        for _ in range(config.steps_per_check):
            rows = next_batch()
            yield lambda rows=rows: distillation_loss(
                draft,
                train[rows, :-1].to(draft.device),
                logits[rows].to(draft.device),
                ids[rows].to(draft.device),
                config.hard_weight,
            )

    def validate(check: int, stats: EpochStats) -> float:
        agreed = agreement(draft, validation, validation_targets[1], config.batch_size)
        losses.append(stats.mean_loss)
        agreements.append(agreed)
        if progress:
            print(
                f"draft check {check + 1}: train loss {stats.mean_loss:.4f}, validation agreement {agreed:.4f}",
                flush=True,
            )
        return 1.0 - agreed

    began = time.perf_counter()
    train_epochs([draft], optimizer, checks(), steps, validate, stopping, grad_clip=1.0)
    reason = "early stopping" if stopping.stop_reason == "early stopping" else "time budget"
    return DraftHistory(
        train_loss=tuple(losses),
        val_agreement=tuple(agreements),
        best_check=max(stopping.best_epoch, 0),
        stop_reason=reason,
        train_tokens=len(losses) * config.steps_per_check * config.batch_size * config.window,
        teacher_seconds=math.nan,
        train_seconds=time.perf_counter() - began,
        start_agreement=start_agreement,
    )


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def without_paragraphs_of(documents: Sequence[str], excluded: Sequence[str], min_chars: int = 40) -> list[str]:
    """``documents`` with every paragraph (blank-line separated) of at least ``min_chars`` characters
    that also occurs in ``excluded`` removed (texts shared between documents: the embedded corpus's
    aggregate topics repeat whole sections of others)."""
    seen = {p for text in excluded for p in _paragraphs(text) if len(p) >= min_chars}
    kept = []
    for text in documents:
        pieces = [p for p in _paragraphs(text) if len(p) < min_chars or p not in seen]
        if pieces:
            kept.append("\n\n".join(pieces))
    return kept


def _interleaved(groups: Sequence[Sequence[str]]) -> list[str]:
    mixed = []
    for i in range(max(len(g) for g in groups)):
        mixed.extend(g[i] for g in groups if i < len(g))
    return mixed


def offline_text_groups(corpus: Optional[Path] = None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """({what: training documents}, {what: validation documents}) of the offline text. Training: the
    embedded corpus's train split, less every paragraph that also occurs in its test split (the
    decoding benchmark's documentation prompts; the corpus's aggregate topics repeat other topics'
    sections), and the standard library's training files (``stdlib_sources``) less every 16th (held
    out); a ``corpus`` folder adds its train split. Validation: the embedded validation split less
    its paragraphs shared with the test split, and the held-out files."""
    from ..data.corpus import embedded_corpus, load_corpus
    from ..data.prompt_suite import stdlib_sources

    embedded = embedded_corpus()
    test = embedded.documents("test")
    files = stdlib_sources()[1]
    code = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    held = code[::16]
    code = [text for i, text in enumerate(code) if i % 16]
    train = {
        "embedded train split less its paragraphs shared with the test split": without_paragraphs_of(
            embedded.documents("train"), test
        ),
        f"{len(code)} standard-library files (prompt files and every 16th file held out)": code,
    }
    if corpus is not None:
        train[f"{corpus} train split"] = load_corpus(corpus).documents("train")
    validation = {
        "embedded validation split less its paragraphs shared with the test split": without_paragraphs_of(
            embedded.documents("validation"), test
        ),
        f"{len(held)} held-out standard-library files": held,
    }
    return train, validation


def draft_text_sources(corpus: Optional[Path] = None) -> tuple[list[str], list[str], list[str]]:
    """(training documents, validation documents, what they are): ``offline_text_groups``, each side's
    groups interleaved (documents alternate, so any token budget covers every group)."""
    train, validation = offline_text_groups(corpus)
    return _interleaved(list(train.values())), _interleaved(list(validation.values())), list(train)


def draft_record(config: DraftConfig, history: DraftHistory, teacher: str, vocabulary: Sequence[int], sources) -> dict:
    return {
        "format": "cascade_bench.draft",
        "version": 1,
        "teacher": teacher,
        "config": asdict(config),
        "training": history.summary(),
        "text": list(sources),
        "vocabulary": list(vocabulary),
    }
