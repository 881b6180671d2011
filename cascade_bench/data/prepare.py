"""From a corpus to ready batches: tokenizer, token streams, training and evaluation windows."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from .corpus import Corpus, load_corpus
from .tokenization import check_vocab_fits, load_tokenizer
from .windows import encode_documents, sliding_windows, training_windows


@dataclass
class PreparedData:
    """Batches per split (train: disjoint windows; validation/test: sliding windows), the
    tokenizer, the corpus, and the conditions to record with every result."""

    train: list
    validation: list
    test: list
    tokenizer: object
    corpus: Corpus
    conditions: dict = field(default_factory=dict)


def prepare_data(
    source: "str | Path | dict" = "embedded",
    tokenizer: str = "bpe:8192",
    seq_len: int = 128,
    batch_size: int = 16,
    eval_stride: Optional[int] = None,
    config: Optional[str] = None,
    cache_dir: "Path | str | None" = None,
    max_positions: Optional[int] = None,
    model_vocab_size: Optional[int] = None,
) -> PreparedData:
    """Load ``source`` (see ``corpus.load_corpus``), load or train the tokenizer (a BPE trains on the
    train split only), and cut each split's EOS-joined token stream into windows.

    eval_stride: sliding-window stride for validation/test (default ``seq_len``: disjoint windows).
    max_positions: the model's limit, checked against ``seq_len``. model_vocab_size: the model's
    vocabulary, checked against the tokenizer's (ValueError if the tokenizer can emit more ids).
    """
    corpus = load_corpus(source, config=config)
    tok = load_tokenizer(tokenizer, corpus.documents("train"), cache_dir=cache_dir)
    if model_vocab_size is not None:
        check_vocab_fits(tok, model_vocab_size)
    stride = seq_len if eval_stride is None else eval_stride
    streams = {split: encode_documents(tok, corpus.documents(split)) for split in ("train", "validation", "test")}
    conditions = {
        "dataset": corpus.name,
        "split_notes": list(corpus.notes),
        "tokenizer": tokenizer,
        "tokenizer_vocab": len(tok),
        "window": seq_len,
        "stride": stride,
        "batch_size": batch_size,
        "stream_tokens": {split: int(s.numel()) for split, s in streams.items()},
    }
    return PreparedData(
        train=training_windows(streams["train"], seq_len, batch_size, max_positions),
        validation=sliding_windows(streams["validation"], seq_len, stride, batch_size, max_positions),
        test=sliding_windows(streams["test"], seq_len, stride, batch_size, max_positions),
        tokenizer=tok,
        corpus=corpus,
        conditions=conditions,
    )


def hold_out_validation(data: PreparedData, batches: int) -> tuple[PreparedData, list]:
    """Split off the last ``batches`` validation batches: (the data without them, the held-out
    batches). Whatever uses the returned data never sees the held-out batches; 0 holds out nothing.
    With sliding windows (stride < window) the first held-out window's unscored context overlaps
    the last kept one; scored tokens are disjoint."""
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
        raise ValueError(f"batches to hold out must be a non-negative integer, got {batches!r}")
    if batches == 0:
        return data, []
    if batches >= len(data.validation):
        raise ValueError(
            f"cannot hold out {batches} of the validation split's {len(data.validation)} batches: "
            f"at least one must stay for early stopping and calibration"
        )
    kept, held = data.validation[:-batches], data.validation[-batches:]
    conditions = {**data.conditions, "validation_batches_held_out": batches}
    return replace(data, validation=kept, conditions=conditions), held
