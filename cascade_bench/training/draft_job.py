"""The ``train-draft`` job: a draft model for a real model, distilled on offline text and saved as a
plain Hugging Face folder (with its tokenizer and ``draft.json``), written atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from ..data.tokenization import check_vocab_fits
from ..data.windows import encode_documents
from ..stages.llm import LLM
from ..stages.model_source import file_sha256, model_fingerprint
from .distillation import (
    DRAFT_RECORD,
    DraftConfig,
    distill,
    draft_from_teacher,
    draft_record,
    draft_text_sources,
    frequent_ids,
    teacher_targets,
    windows_of,
)


def train_draft(
    teacher_path: str,
    out: Path,
    config: Optional[DraftConfig] = None,
    corpus: Optional[Path] = None,
    cache_dir: Optional[Path] = None,
    teacher_name: Optional[str] = None,
    progress: bool = True,
) -> dict:
    """Distil a draft from the model folder ``teacher_path`` into ``out``; returns its record."""
    from transformers import AutoTokenizer

    config = DraftConfig() if config is None else config
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    teacher = LLM.from_pretrained(teacher_path)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    check_vocab_fits(tokenizer, teacher.vocab_size)  # the draft uses the teacher's tokenizer
    draft = draft_from_teacher(teacher, config.layers)  # checks the layer count before any long work
    documents, held_out, sources = draft_text_sources(corpus)
    stream = encode_documents(tokenizer, documents)
    train = windows_of(stream, config.window, config.teacher_tokens)
    validation = windows_of(encode_documents(tokenizer, held_out), config.window, config.validation_tokens)
    fingerprint = _teacher_fingerprint(Path(teacher_path), teacher)
    began = time.perf_counter()
    if progress:
        print(f"teacher labels {train.numel() + validation.numel():,} tokens (top {config.top_k})", flush=True)
    train_targets = teacher_targets(teacher, train, config.top_k, cache_dir, fingerprint)
    validation_targets = teacher_targets(teacher, validation, config.top_k, cache_dir, fingerprint)
    teacher_seconds = time.perf_counter() - began
    del teacher
    history = distill(draft, train, train_targets, validation, validation_targets, config, progress)
    history = replace(history, teacher_seconds=teacher_seconds)
    vocabulary = frequent_ids(train[:, :-1].reshape(-1), config.vocabulary, draft.vocab_size)
    record = draft_record(config, history, teacher_name or teacher_path, vocabulary, sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        draft.model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / DRAFT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return record


def _teacher_fingerprint(folder: Path, teacher: LLM) -> str:
    """What shapes the teacher's targets: its folder (config, file names and sizes), the content of
    its weight files and the dtype it ran in; another checkpoint never reuses cached targets."""
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")) if folder.is_dir() else []
    contents = ",".join(f"{p.name}:{file_sha256(p)}" for p in weights)
    return f"{model_fingerprint(str(folder))}|{contents}|{teacher.dtype}"


def read_draft_vocabulary(folder: Path) -> Optional[torch.Tensor]:
    """The decode vocabulary recorded in a draft folder (None when it has no record or uses all ids)."""
    path = Path(folder) / DRAFT_RECORD
    if not path.is_file():
        return None
    ids = json.loads(path.read_text())["vocabulary"]
    return torch.tensor(ids, dtype=torch.long)
