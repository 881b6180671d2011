"""The decoding benchmark's prompt suite: fixed, versioned, offline prompt sets.

Three sets, each cut by a fixed rule so that a run on another machine with the same interpreter
and corpus gets the same prompts (``SUITE_VERSION`` changes when a rule does):

- ``documentation``: the embedded corpus's test split (CPython's documentation topics), one
  prompt from the start of each piece, in order.
- ``code``: Python source of the running interpreter's standard library. Its top-level ``*.py``
  files, sorted by name, are split by index: every ``CODE_PROMPT_EVERY``-th file (from index
  ``CODE_PROMPT_OFFSET``) gives prompts, the others are training text for draft models
  (:func:`stdlib_sources`), so no prompt is ever trained on. A prompt starts at the file's first
  top-level ``def`` or ``class`` line.
- ``prose``: WikiText-2's test file from a corpus folder (``--corpus``, the file read whole);
  articles are cut at their `` = Title = `` lines and a prompt starts at an article's first
  paragraph. Skipped with a note when no folder is given.

Prompt ``i`` of a set has ``PROMPT_LENGTHS[i % 4]`` tokens (64-256): the sources are taken in order
and one too short for its length is skipped. A user's own set: :func:`read_prompts_file` (JSON
lines, one ``{"text": ..., "set": ...}`` per line).
"""

from __future__ import annotations

import json
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

SUITE_VERSION = 1
PROMPT_SETS = ("documentation", "code", "prose")
PROMPT_LENGTHS = (64, 128, 192, 256)
CODE_PROMPT_EVERY = 8
CODE_PROMPT_OFFSET = 3
_DEFINITION = re.compile(r"^(def|class|async def) ", re.MULTILINE)
_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)


@dataclass(frozen=True)
class Prompt:
    """One prompt: its set, where its text comes from, and its token ids."""

    prompt_set: str
    source: str
    ids: tuple[int, ...]


def stdlib_sources() -> tuple[list[Path], list[Path]]:
    """(prompt files, training files) of the standard library's top-level sources (module doc)."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(folder.glob("*.py"))
    if not files:
        raise ValueError(f"no Python sources in the standard library folder {folder}")
    prompt = [f for i, f in enumerate(files) if i % CODE_PROMPT_EVERY == CODE_PROMPT_OFFSET]
    training = [f for i, f in enumerate(files) if i % CODE_PROMPT_EVERY != CODE_PROMPT_OFFSET]
    return prompt, training


def _code_texts() -> list[tuple[str, str]]:
    texts = []
    for path in stdlib_sources()[0]:
        text = path.read_text(encoding="utf-8", errors="replace")
        found = _DEFINITION.search(text)
        if found is not None:
            texts.append((f"stdlib:{path.name}", text[found.start() :]))
    return texts


def _documentation_texts() -> list[tuple[str, str]]:
    from .corpus import embedded_corpus

    return [(f"embedded test piece {i}", text) for i, text in enumerate(embedded_corpus().documents("test"))]


def wikitext_articles(text: str) -> list[str]:
    """The articles of a WikiText file, each from its first paragraph (titles and headings dropped)."""
    starts = [m.end() for m in _ARTICLE_TITLE.finditer(text)]
    articles = []
    for begin, end in zip(starts, starts[1:] + [len(text)]):
        body = text[begin:end]
        lines = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("=")]
        if lines:
            articles.append("\n".join(lines))
    return articles


def _prose_texts(corpus: Path) -> list[tuple[str, str]]:
    """Articles of the test file itself (``corpus`` is the file, or a folder holding one whose name
    says test), read whole: never through a split rule that would cut it."""
    from .corpus import _find_split_files

    corpus = Path(corpus)
    path = corpus if corpus.is_file() else _find_split_files(corpus).get("test")
    if path is None or path.suffix not in (".txt", ".raw", ".tokens", ".text"):
        raise ValueError(f"--corpus {corpus}: expected a text file named for the test split (e.g. wiki.test.raw)")
    text = path.read_text(encoding="utf-8")
    articles = wikitext_articles(text) or [text]
    return [(f"{path.name} article {i}", article) for i, article in enumerate(articles)]


def _cut(prompt_set: str, texts: list[tuple[str, str]], tokenizer, count: int) -> list[Prompt]:
    prompts: list[Prompt] = []
    for source, text in texts:
        if len(prompts) == count:
            break
        length = PROMPT_LENGTHS[len(prompts) % len(PROMPT_LENGTHS)]
        ids = tokenizer(text[: length * 16], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            prompts.append(Prompt(prompt_set, source, tuple(ids[:length])))
    if len(prompts) < count:
        raise ValueError(f"the {prompt_set} set has sources for {len(prompts)} prompts, fewer than the {count} asked")
    return prompts


def prompt_suite(
    tokenizer, per_set: int = 8, corpus: Optional[Path] = None, sets: Sequence[str] = PROMPT_SETS
) -> tuple[dict[str, list[Prompt]], list[str]]:
    """({set: prompts}, notes): ``per_set`` prompts of each of ``sets`` through ``tokenizer``."""
    if isinstance(per_set, bool) or not isinstance(per_set, int) or per_set < 1:
        raise ValueError(f"per_set must be a positive int, got {per_set!r}")
    unknown = [s for s in sets if s not in PROMPT_SETS]
    if unknown:
        raise ValueError(f"unknown prompt sets {unknown}; expected some of {PROMPT_SETS}")
    if corpus is not None and not Path(corpus).exists():
        raise ValueError(f"--corpus {corpus} does not exist; expected a folder holding WikiText-2's test file")
    suite, notes = {}, []
    for name in sets:
        if name == "prose" and corpus is None:
            notes.append("prose skipped: no --corpus folder with WikiText-2's test split was given")
            continue
        texts = {
            "documentation": _documentation_texts,
            "code": _code_texts,
            "prose": lambda: _prose_texts(Path(corpus)),
        }[name]()
        suite[name] = _cut(name, texts, tokenizer, per_set)
    return suite, notes


def read_prompts_file(path: Path, tokenizer, max_tokens: int = 1024) -> dict[str, list[Prompt]]:
    """A user's prompts: JSON lines ``{"text": str, "set": str (optional, default "user")}``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--prompts {path} is not a file; expected JSON lines with a 'text' field")
    suite: dict[str, list[Prompt]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON: {error}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{path} line {number}: expected an object with a non-empty 'text' string, got {line!r}")
        name = row.get("set", "user")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{path} line {number}: 'set' must be a non-empty string, got {name!r}")
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"][-max_tokens:]
        if not ids:
            raise ValueError(f"{path} line {number}: the text gives no tokens")
        suite.setdefault(name, []).append(Prompt(name, f"{path.name}:{number}", tuple(ids)))
    if not suite:
        raise ValueError(f"{path} holds no prompts")
    return suite
