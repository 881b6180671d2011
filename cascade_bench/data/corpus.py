"""Corpora: documents per split, loaded through ``datasets`` or from the embedded default.

Sources (:func:`load_corpus`):

- ``"embedded"`` (the default): CPython's documentation topics (``pydoc_data.topics``, about
  0.47 MB of English prose and examples from the Python reference manual), installed with every
  CPython, so the main command runs offline. Its distinct documents in name order (two topics
  share one text, kept once so no text is in two splits) are cut into pieces of whole
  paragraphs of at least ``EMBEDDED_PIECE_CHARS`` characters (:func:`paragraph_pieces`), and
  each piece goes to the split furthest below its 80/10/10 share of characters
  (:func:`balanced_assignment`). Whole documents would be too coarse: there are only 78, and one
  ("string-methods") would be half of the test split; pieces give every split a share of every
  topic, with no text in two splits.
- a hub name (``"wikitext"`` with ``config="wikitext-2-raw-v1"``) through ``datasets.load_dataset``,
  for users online. WikiText rows are lines of one long text, joined back as they were.
- a local folder holding split files (names containing ``train``, ``valid``/``validation``/``dev``,
  ``test``; ``.txt``/``.raw``/``.tokens`` text, ``.parquet``, ``.json``/``.jsonl``), or explicit
  ``{split: path}`` files. A text file is one document; parquet/JSON rows are documents (their
  ``text`` column).

- a single file of those formats (or a folder holding exactly one such file, named for no split):
  cut in order into train / validation / test with ``SINGLE_FILE_SHARES`` (90/5/5) of its
  characters (:func:`cut_in_order`): at document boundaries when it holds at least 20 documents
  (parquet/JSON rows), else at line boundaries of its text; the cut is recorded in ``Corpus.notes``.

Missing splits are made deterministically (:func:`complete_splits`) and the rule is recorded
in ``Corpus.notes``: no train split -> the first 80% of validation becomes train and the last
20% stays validation (test untouched, so test figures stay comparable); no validation -> the
last 10% of train; no test -> the last 10% of what train is left. A split of at least 10
documents is cut by :func:`balanced_assignment`; fewer (one long text, as WikiText files)
are cut at the line boundary nearest the fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

SPLITS = ("train", "validation", "test")
_SPLIT_WORDS = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
_TEXT_SUFFIXES = {".txt", ".raw", ".tokens", ".text"}
_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
#: A corpus that is one file: shares of its characters for train / validation / test, in that order.
SINGLE_FILE_SHARES = (0.9, 0.05, 0.05)


@dataclass(frozen=True)
class Corpus:
    """Documents per split ("train", "validation", "test"), where they came from, and how splits were made."""

    name: str
    splits: dict
    notes: tuple = field(default_factory=tuple)

    def documents(self, split: str) -> list[str]:
        if split not in self.splits:
            raise ValueError(f"corpus {self.name!r} has no split {split!r}; it has {sorted(self.splits)}")
        return self.splits[split]


def embedded_documents() -> list[tuple[str, str]]:
    """(topic name, text) for every documentation topic installed with CPython, sorted by name."""
    from pydoc_data.topics import topics

    return [(name, topics[name]) for name in sorted(topics)]


def balanced_assignment(documents: list[str], fractions: tuple[float, ...]) -> list[int]:
    """Deterministic split of documents, in order, into parts of about ``fractions`` of the characters:
    each document goes to the part furthest below its share so far."""
    assigned = [0] * len(fractions)
    total, parts = 0, []
    for doc in documents:
        total += len(doc)
        part = max(range(len(fractions)), key=lambda i: (fractions[i] * total - assigned[i], -i))
        assigned[part] += len(doc)
        parts.append(part)
    return parts


#: Minimum characters of one piece of an embedded document (whole paragraphs; see the module doc).
EMBEDDED_PIECE_CHARS = 2000


def paragraph_pieces(text: str, min_chars: int) -> list[str]:
    """``text`` cut at blank lines into consecutive pieces of whole paragraphs, each at least
    ``min_chars`` long except possibly the last (which joins the previous piece when shorter than
    half of it). Joining the pieces with blank lines gives the paragraphs back."""
    pieces, current = [], []
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        if sum(map(len, current)) >= min_chars:
            pieces.append("\n\n".join(current))
            current = []
    if current:
        tail = "\n\n".join(current)
        if pieces and len(tail) < min_chars // 2:
            pieces[-1] = pieces[-1] + "\n\n" + tail
        else:
            pieces.append(tail)
    return [piece for piece in pieces if piece.strip()]


def embedded_corpus() -> Corpus:
    """The embedded default corpus, split train / validation / test 80/10/10 by characters (see module doc)."""
    docs = list(dict.fromkeys(text for _, text in embedded_documents()))  # some topics share one text
    pieces = [piece for doc in docs for piece in paragraph_pieces(doc, EMBEDDED_PIECE_CHARS)]
    parts = balanced_assignment(pieces, (0.8, 0.1, 0.1))
    splits = {split: [d for d, p in zip(pieces, parts) if p == i] for i, split in enumerate(SPLITS)}
    return Corpus(
        "embedded:pydoc_data.topics",
        splits,
        (
            f"distinct documents in name order cut into pieces of whole paragraphs (at least "
            f"{EMBEDDED_PIECE_CHARS} characters), each piece to the split furthest below its 80/10/10 share "
            f"of characters",
        ),
    )


def _split_of(path: Path) -> Optional[str]:
    name = path.name.lower()
    for split, words in _SPLIT_WORDS.items():
        if any(word in name for word in words):
            return split
    return None


def _corpus_files(folder: Path) -> list[Path]:
    return [
        path
        for path in sorted(folder.iterdir())
        if path.is_file() and (path.suffix.lower() in _TEXT_SUFFIXES or path.suffix.lower() in _BUILDERS)
    ]


def _find_split_files(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in _corpus_files(folder):
        split = _split_of(path)
        if split is None:
            continue
        if split in found:
            raise ValueError(f"two files for split {split!r} in {folder}: {found[split].name} and {path.name}")
        found[split] = path
    if not found:
        raise ValueError(
            f"no split files in {folder}: expected names containing train / valid(ation) / test "
            f"with suffix {sorted(_TEXT_SUFFIXES | set(_BUILDERS))}, or exactly one such file "
            f"(split {'/'.join(str(round(100 * s)) for s in SINGLE_FILE_SHARES)} in order)"
        )
    return found


def cut_in_order(documents: list[str], shares: tuple[float, ...] = SINGLE_FILE_SHARES) -> tuple[list[list[str]], str]:
    """``documents`` cut in order into consecutive parts of about ``shares`` of their characters:
    whole documents when there are at least 20, else the joined text at line boundaries (a part
    ends at the last line end before its share is reached). Returns the parts and the boundary kind."""
    total = sum(map(len, documents))
    bounds = [round(total * sum(shares[: k + 1])) for k in range(len(shares) - 1)]
    if len(documents) >= 20:
        parts, ends, done = [[] for _ in shares], [*bounds, math.inf], 0
        for doc in documents:
            part = next(k for k, end in enumerate(ends) if done < end)
            parts[part].append(doc)
            done += len(doc)
        return parts, "document"
    text = "".join(documents)
    cuts = [0]
    for bound in bounds:
        line_end = text.rfind("\n", cuts[-1], bound) + 1
        cuts.append(line_end if line_end > cuts[-1] else bound)
    cuts.append(len(text))
    return [[text[a:b]] for a, b in zip(cuts, cuts[1:])], "line"


def _single_file(path: Path, text_column: str) -> tuple[dict[str, list[str]], tuple[str, ...]]:
    suffix = path.suffix.lower()
    if suffix not in _TEXT_SUFFIXES and suffix not in _BUILDERS:
        raise ValueError(f"{path} is not a corpus file: expected suffix {sorted(_TEXT_SUFFIXES | set(_BUILDERS))}")
    documents = _load_files({"train": path}, text_column)["train"]
    if not documents:
        raise ValueError(f"{path} holds no text")
    parts, boundary = cut_in_order(documents)
    shares = "/".join(str(round(100 * s)) for s in SINGLE_FILE_SHARES)
    note = (
        f"one file {path.name}: train / validation / test = consecutive {shares}% of its characters, "
        f"cut at {boundary} boundaries"
    )
    return dict(zip(SPLITS, parts)), (note,)


def _load_files(files: dict[str, Path], text_column: str) -> dict[str, list[str]]:
    import datasets

    for split, path in files.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for {path}; expected one of {SPLITS}")
        if not Path(path).is_file():
            raise ValueError(f"missing file for split {split!r}: {path}")
    suffixes = {Path(p).suffix.lower() for p in files.values()}
    if len(suffixes) != 1:
        raise ValueError(f"split files must share one format, got suffixes {sorted(suffixes)}")
    suffix = suffixes.pop()
    data_files = {split: str(path) for split, path in files.items()}
    if suffix in _TEXT_SUFFIXES:
        loaded = datasets.load_dataset("text", data_files=data_files, sample_by="document")
        column = "text"
    else:
        loaded = datasets.load_dataset(_BUILDERS[suffix], data_files=data_files)
        column = text_column
    splits = {}
    for split in files:
        if column not in loaded[split].column_names:
            raise ValueError(f"{files[split]} has no column {column!r}; columns: {loaded[split].column_names}")
        splits[split] = [text for text in loaded[split][column] if text and text.strip()]
    return splits


def _load_hub(name: str, config: Optional[str], text_column: str, rows_are_lines: bool) -> dict[str, list[str]]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as error:  # network, unknown name: say which dataset and why, in one line
        raise ValueError(
            f"could not load hub dataset {name!r} (config {config!r}): {error}; offline, use a "
            f"local folder of split files or 'embedded'"
        ) from error
    splits = {}
    for split in loaded:
        target = {"valid": "validation", "dev": "validation"}.get(split, split)
        if target not in SPLITS:
            continue
        rows = loaded[split][text_column]
        splits[target] = ["".join(rows)] if rows_are_lines else [r for r in rows if r and r.strip()]
    return splits


def _cut(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split documents into (head, tail) with about ``fraction`` in the tail (see module doc)."""
    if len(documents) >= 10:
        parts = balanced_assignment(documents, (1 - fraction, fraction))
        return [d for d, p in zip(documents, parts) if p == 0], [d for d, p in zip(documents, parts) if p == 1]
    text = "".join(documents)
    cut = text.rfind("\n", 0, int(len(text) * (1 - fraction))) + 1 or int(len(text) * (1 - fraction))
    return [text[:cut]], [text[cut:]]


def complete_splits(splits: dict[str, list[str]]) -> tuple[dict[str, list[str]], tuple[str, ...]]:
    """Make train/validation/test from whatever splits exist, deterministically; return the rule used."""
    splits = {k: v for k, v in splits.items() if v}
    notes = []
    if not splits:
        raise ValueError("the corpus has no non-empty split")
    if "train" not in splits:
        source = "validation" if "validation" in splits else next(iter(splits))
        splits["train"], splits[source] = _cut(splits[source], 0.2)
        notes.append(f"no train split: train = first 80% of {source}, {source} = last 20%")
    if "validation" not in splits:
        splits["train"], splits["validation"] = _cut(splits["train"], 0.1)
        notes.append("no validation split: validation = last 10% of train")
    if "test" not in splits:
        splits["train"], splits["test"] = _cut(splits["train"], 0.1)
        notes.append("no test split: test = last 10% of train")
    for split in SPLITS:
        if not splits.get(split) or not any(d.strip() for d in splits[split]):
            raise ValueError(f"split {split!r} is empty after splitting; the corpus is too small")
    return {split: splits[split] for split in SPLITS}, tuple(notes)


def load_corpus(
    source: "str | Path | dict" = "embedded",
    config: Optional[str] = None,
    text_column: str = "text",
    rows_are_lines: Optional[bool] = None,
) -> Corpus:
    """Load a corpus: ``"embedded"``, a local folder, ``{split: file}``, or a hub dataset name.

    ``rows_are_lines`` (hub datasets): rows are lines of one text (WikiText) rather than documents;
    defaults to True for names starting with ``wikitext``.
    """
    if isinstance(source, dict):
        splits = _load_files({k: Path(v) for k, v in source.items()}, text_column)
        name = "files:" + ",".join(f"{k}={v}" for k, v in sorted(source.items()))
    elif str(source) == "embedded":
        return embedded_corpus()
    elif Path(source).exists():
        path = Path(source)
        files = [path] if path.is_file() else _corpus_files(path)
        if path.is_file() or (len(files) == 1 and _split_of(files[0]) is None):
            splits, cut = _single_file(files[0], text_column)
            name = f"file:{files[0]}"
            for split, docs in splits.items():
                if not docs or not any(d.strip() for d in docs):
                    raise ValueError(
                        f"split {split!r} of {name} is empty: the file is too small to split {SINGLE_FILE_SHARES}"
                    )
            return Corpus(name, splits, cut)
        splits = _load_files(_find_split_files(path), text_column)
        name = f"folder:{path}"
    elif isinstance(source, Path) or str(source).startswith((".", "/", "~")):
        raise ValueError(f"missing corpus folder {source}")
    else:
        lines = str(source).startswith("wikitext") if rows_are_lines is None else rows_are_lines
        splits = _load_hub(str(source), config, text_column, lines)
        name = f"hub:{source}" + (f"/{config}" if config else "")
    for split, docs in splits.items():
        if not docs:
            raise ValueError(f"split {split!r} of {name} is empty")
    completed, notes = complete_splits(splits)
    return Corpus(name, completed, notes)


#: What ``embedded_byte_windows`` feeds a cascade, as the benchmarks' conditions name it.
EMBEDDED_BYTES = "CPython pydoc_data topics, UTF-8 bytes as token ids"


def embedded_byte_windows(rows: int, seq_len: int) -> Tensor:
    """The embedded documents (``embedded_documents``, joined by blank lines) as ``rows`` windows of
    ``seq_len`` byte ids, shape (rows, seq_len): real text for the speed benchmarks, offline."""
    return byte_token_windows("\n\n".join(body for _, body in embedded_documents()), rows, seq_len)


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
