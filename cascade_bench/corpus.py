"""Real text that ships with every CPython install, for offline runs.

The embedded default corpus is CPython's own documentation topics (``pydoc_data.topics``,
about 0.47 MB of English prose and examples from the Python reference manual).
"""

from __future__ import annotations

import torch
from torch import Tensor


def embedded_documents() -> list[tuple[str, str]]:
    """(topic name, text) for every documentation topic installed with CPython, sorted by name."""
    from pydoc_data.topics import topics

    return [(name, topics[name]) for name in sorted(topics)]


def byte_token_windows(text: str, batch_size: int, seq_len: int) -> Tensor:
    """The first batch_size * seq_len UTF-8 bytes of ``text`` as token ids 0..255, shape (B, T).

    A byte-level stand-in for a tokenizer, for speed benchmarks on real text with any vocabulary
    of at least 256 ids. Raises ValueError if the text is too short.
    """
    data = text.encode("utf-8")
    needed = batch_size * seq_len
    if len(data) < needed:
        raise ValueError(f"text has {len(data)} bytes, need {needed} for {batch_size} x {seq_len} windows")
    return torch.frombuffer(bytearray(data[:needed]), dtype=torch.uint8).long().view(batch_size, seq_len)
