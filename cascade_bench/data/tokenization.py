"""Tokenizers: a local Hugging Face tokenizer folder or hub name, or a byte-level BPE trained on
the training split only with ``tokenizers`` and cached on disk.

Spec strings (:func:`load_tokenizer`): a folder path or hub name, or ``"bpe:<vocab size>"``.
The BPE cache file is keyed by the vocab size and a hash of the training text, so the same
corpus reuses it and any change of the training split retrains.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

EOS_TOKEN = "<|endoftext|>"
DEFAULT_CACHE = Path.home() / ".cache" / "cascade_bench" / "tokenizers"


def _train_bpe(texts: Sequence[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def bpe_cache_path(texts: Sequence[str], vocab_size: int, cache_dir: Path) -> Path:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return Path(cache_dir) / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"


#: Files one of which a folder holds when it holds a tokenizer (``save_pretrained``).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def has_tokenizer_files(folder: "Path | str") -> bool:
    """Whether ``folder`` holds a saved tokenizer (one of ``TOKENIZER_FILES``)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizer_folder(folder: "Path | str", what: str) -> None:
    """ValueError naming ``folder`` when it is a folder without a tokenizer: a model reads its own ids, so
    its text must go through its own tokenizer."""
    if Path(folder).is_dir() and not has_tokenizer_files(folder):
        raise ValueError(
            f"{what} {folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): a model reads its own "
            "ids, so its text must go through its own tokenizer; save it into the folder "
            "(tokenizer.save_pretrained(folder)) or give a tokenizer folder"
        )


def load_tokenizer(spec: str, train_texts: Optional[Sequence[str]] = None, cache_dir: "Path | str | None" = None):
    """A ``PreTrainedTokenizerFast`` with an EOS token, from ``spec`` (see module docstring).

    ``"bpe:N"`` trains (or loads from ``cache_dir``) a byte-level BPE of N tokens on ``train_texts``,
    which must be the training split only.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if spec.startswith("bpe:"):
        try:
            vocab_size = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"tokenizer spec {spec!r}: expected 'bpe:<vocab size>', e.g. 'bpe:8192'") from None
        if vocab_size < 257:
            raise ValueError(f"a byte-level BPE needs a vocab of at least 257 (256 bytes + EOS), got {vocab_size}")
        if not train_texts:
            raise ValueError("training a BPE tokenizer needs the training split's texts (train_texts)")
        path = bpe_cache_path(train_texts, vocab_size, Path(cache_dir) if cache_dir else DEFAULT_CACHE)
        if not path.exists():
            from .storage import write_text_atomic

            write_text_atomic(path, _train_bpe(train_texts, vocab_size).to_str())
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS_TOKEN)
        tokenizer.name_or_path = str(path)
        return tokenizer
    if Path(spec).exists() or not spec.startswith((".", "/", "~")):
        check_tokenizer_folder(spec, "tokenizer folder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except (OSError, ValueError) as error:
            raise ValueError(f"could not load tokenizer {spec!r}: {error}") from error
    else:
        raise ValueError(f"missing tokenizer folder {spec}")
    if tokenizer.eos_token_id is None and EOS_TOKEN in tokenizer.get_vocab():
        tokenizer.eos_token = EOS_TOKEN  # GPT-2-style folders whose config names no EOS but define it
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {spec!r} has no EOS token (and no {EOS_TOKEN!r}); documents are joined with EOS")
    return tokenizer


def tokenizer_vocab_size(tokenizer) -> int:
    """Number of ids the tokenizer can produce (base vocab plus added tokens)."""
    return len(tokenizer)


def check_vocab_fits(tokenizer, model_vocab_size: int) -> None:
    """ValueError if the tokenizer can emit ids the model has no embedding for."""
    size = tokenizer_vocab_size(tokenizer)
    if size > model_vocab_size:
        raise ValueError(
            f"tokenizer vocab {size} exceeds the model's vocab size {model_vocab_size}; "
            f"use a model with vocab_size >= {size} or a smaller tokenizer"
        )
