"""The decoding prompt suite: fixed rules, no prompt in any draft's training text, and a user's
prompts file read with clear errors."""

from __future__ import annotations

import json

import pytest

from cascade_bench.data.prompt_suite import (
    CODE_PROMPT_EVERY,
    PROMPT_LENGTHS,
    prompt_suite,
    read_prompts_file,
    stdlib_sources,
    wikitext_articles,
)
from cascade_bench.training.distillation import draft_text_sources


class WhitespaceTokenizer:
    """Token ids = word positions in a growing vocabulary (enough for cutting prompts)."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]}


def test_code_prompts_come_from_files_no_draft_trains_on():
    prompt_files, training_files = stdlib_sources()
    assert not set(prompt_files) & set(training_files)
    assert len(prompt_files) == pytest.approx((len(prompt_files) + len(training_files)) / CODE_PROMPT_EVERY, abs=1)
    documents, validation, _ = draft_text_sources()
    prompt_texts = {f.read_text(encoding="utf-8", errors="replace") for f in prompt_files}
    assert not prompt_texts & (set(documents) | set(validation))


def test_prompts_cycle_through_the_lengths_and_start_where_the_rule_says():
    suite, notes = prompt_suite(WhitespaceTokenizer(), per_set=5, sets=("documentation", "code"))
    assert notes == []
    for prompts in suite.values():
        assert [len(p.ids) for p in prompts] == [PROMPT_LENGTHS[i % 4] for i in range(5)]
    first = suite["code"][0]
    assert first.source.startswith("stdlib:")
    text = (stdlib_sources()[0][0].parent / first.source.split(":", 1)[1]).read_text()
    assert any(line.startswith(("def ", "class ", "async def ")) for line in text.splitlines())


def test_prose_without_a_corpus_is_skipped_with_a_note():
    suite, notes = prompt_suite(WhitespaceTokenizer(), per_set=1, sets=("prose",))
    assert suite == {} and "prose skipped" in notes[0]


def test_wikitext_articles_start_at_their_first_paragraph():
    text = " = Alpha = \n\n First line .\n\n = = Section = = \n\n Second .\n = Beta = \n\n Third .\n"
    assert wikitext_articles(text) == ["First line .\nSecond .", "Third ."]


def test_a_prompts_file_is_read_per_set_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"text": "a b c"}) + "\n\n" + json.dumps({"text": "d e", "set": "mine"}) + "\n")
    suite = read_prompts_file(good, WhitespaceTokenizer())
    assert {name: [len(p.ids) for p in prompts] for name, prompts in suite.items()} == {"user": [3], "mine": [2]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: expected an object with a non-empty 'text'"):
        read_prompts_file(bad, WhitespaceTokenizer())
    with pytest.raises(ValueError, match="is not a file"):
        read_prompts_file(tmp_path / "missing.jsonl", WhitespaceTokenizer())
    with pytest.raises(ValueError, match="per_set must be a positive int, got 0"):
        prompt_suite(WhitespaceTokenizer(), per_set=0)
    with pytest.raises(ValueError, match="unknown prompt sets \\['poetry'\\]"):
        prompt_suite(WhitespaceTokenizer(), sets=("poetry",))


def test_no_documentation_prompt_text_is_in_the_draft_s_training_text():
    """The embedded corpus's aggregate topics repeat other topics' sections, so its train split holds
    test text; the draft's training text drops those paragraphs (70 of 369 120-character chunks of
    the test pieces' first 2,400 characters were in the train split before)."""
    from cascade_bench.data.corpus import embedded_corpus

    documents, _, _ = draft_text_sources()
    joined = "\n".join(documents)
    for piece in embedded_corpus().documents("test"):
        for start in range(0, min(len(piece), 2400) - 120, 120):
            assert piece[start : start + 120] not in joined


def test_prose_prompts_read_the_test_file_whole(tmp_path):
    folder = tmp_path / "wikitext"
    folder.mkdir()
    articles = [f" = Title {i} = \n\n " + " ".join(f"w{i}x{j}" for j in range(300)) + " \n" for i in range(3)]
    (folder / "wiki.test.raw").write_text("".join(articles))
    (folder / "wiki.valid.raw").write_text(" = Other = \n\n nothing here \n")
    suite, _ = prompt_suite(WhitespaceTokenizer(), per_set=2, corpus=folder, sets=("prose",))
    assert [p.source for p in suite["prose"]] == ["wiki.test.raw article 0", "wiki.test.raw article 1"]
    (folder / "wiki.test.raw").unlink()
    with pytest.raises(ValueError, match="expected a text file named for the test split"):
        prompt_suite(WhitespaceTokenizer(), per_set=1, corpus=folder, sets=("prose",))
