"""Corpora, tokenizers and windows."""

from __future__ import annotations

import pytest
import torch

from cascade_bench.data.batch import IGNORE_INDEX
from cascade_bench.data.corpus import balanced_assignment, complete_splits, embedded_corpus, load_corpus
from cascade_bench.data.prepare import hold_out_validation, prepare_data
from cascade_bench.data.tokenization import bpe_cache_path, check_vocab_fits, load_tokenizer
from cascade_bench.data.windows import encode_documents, sliding_windows, training_windows


def test_embedded_corpus_is_real_text_split_deterministically():
    corpus = embedded_corpus()
    assert set(corpus.splits) == {"train", "validation", "test"}
    sizes = {split: sum(map(len, docs)) for split, docs in corpus.splits.items()}
    total = sum(sizes.values())
    assert 0.75 < sizes["train"] / total < 0.85 and 0.05 < sizes["test"] / total < 0.15
    seen = [doc for docs in corpus.splits.values() for doc in docs]
    assert len(seen) == len(set(seen))  # no document in two splits
    assert "assert" in "".join(seen) and corpus.splits == embedded_corpus().splits


def test_balanced_assignment_by_hand():
    assert balanced_assignment(["a" * 8, "b", "c"], (0.8, 0.1, 0.1)) == [0, 1, 2]
    assert balanced_assignment(["x"] * 10, (0.5, 0.5)) == [0, 1] * 5


def _write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_local_folder_of_split_files(tmp_path):
    folder = _write(
        tmp_path / "c",
        {
            "wiki.train.raw": "one two\nthree\n",
            "wiki.valid.raw": "four five\n",
            "wiki.test.raw": "six\n",
            "README.md": "not a split",
        },
    )
    corpus = load_corpus(folder)
    assert corpus.splits == {"train": ["one two\nthree\n"], "validation": ["four five\n"], "test": ["six\n"]}
    assert corpus.notes == ()
    explicit = load_corpus(
        {"train": folder / "wiki.train.raw", "validation": folder / "wiki.valid.raw", "test": folder / "wiki.test.raw"}
    )
    assert explicit.splits == corpus.splits


def test_missing_train_split_is_carved_from_validation(tmp_path):
    valid = "".join(f"line {i}\n" for i in range(100))
    folder = _write(tmp_path / "w", {"wiki.valid.raw": valid, "wiki.test.raw": "held out\n"})
    corpus = load_corpus(folder)
    assert corpus.splits["test"] == ["held out\n"]
    assert corpus.splits["train"][0] + corpus.splits["validation"][0] == valid
    assert corpus.splits["train"][0].endswith("\n") and len(corpus.splits["train"][0]) < 0.81 * len(valid)
    assert corpus.notes == ("no train split: train = first 80% of validation, validation = last 20%",)


def test_parquet_rows_are_documents(tmp_path):
    import pandas as pd

    folder = tmp_path / "p"
    folder.mkdir()
    for split, texts in {"train": ["a b", "c d", ""], "validation": ["e"], "test": ["f"]}.items():
        pd.DataFrame({"text": texts}).to_parquet(folder / f"{split}.parquet")
    corpus = load_corpus(folder)
    assert corpus.splits["train"] == ["a b", "c d"]  # empty rows dropped


def test_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="missing corpus folder"):
        load_corpus(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="missing file for split 'train'"):
        load_corpus({"train": tmp_path / "absent.txt"})
    with pytest.raises(ValueError, match="no split files in"):
        load_corpus(_write(tmp_path / "two", {"notes.txt": "x", "more.txt": "y"}))
    with pytest.raises(ValueError, match="the file is too small to split"):
        load_corpus(_write(tmp_path / "one", {"notes.txt": "x"}))
    with pytest.raises(ValueError, match="split 'test' is empty"):
        complete_splits({"train": ["x"], "validation": ["y"], "test": ["   "]})
    with pytest.raises(ValueError, match="has no split 'dev'"):
        embedded_corpus().documents("dev")


def test_bpe_trains_on_train_only_and_is_cached(tmp_path):
    texts = ["the cat sat on the mat. " * 20, "a dog ran. " * 20]
    first = load_tokenizer("bpe:300", texts, cache_dir=tmp_path)
    path = bpe_cache_path(texts, 300, tmp_path)
    assert path.exists() and len(first) <= 300 and first.eos_token == "<|endoftext|>"
    stamp = path.stat().st_mtime_ns
    again = load_tokenizer("bpe:300", texts, cache_dir=tmp_path)
    assert path.stat().st_mtime_ns == stamp and again("the cat")["input_ids"] == first("the cat")["input_ids"]
    other = bpe_cache_path(texts + ["new text"], 300, tmp_path)
    assert other != path
    first.save_pretrained(tmp_path / "tok")
    reloaded = load_tokenizer(str(tmp_path / "tok"))
    assert reloaded("the mat")["input_ids"] == first("the mat")["input_ids"]
    with pytest.raises(ValueError, match="expected 'bpe:<vocab size>'"):
        load_tokenizer("bpe:many", texts)
    with pytest.raises(ValueError, match="at least 257"):
        load_tokenizer("bpe:100", texts)
    with pytest.raises(ValueError, match="tokenizer vocab .* exceeds the model's vocab size 256"):
        check_vocab_fits(first, 256)
    with pytest.raises(ValueError, match="missing tokenizer folder"):
        load_tokenizer(str(tmp_path / "no-such-folder"))


class _CharTokenizer:
    """Hand-checkable tokenizer: one id per character, EOS = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=True):
        return {"input_ids": [[ord(c) - 96 for c in t] for t in texts]}


def test_streams_join_documents_with_eos():
    stream = encode_documents(_CharTokenizer(), ["ab", "c"])
    assert stream.tolist() == [1, 2, 0, 3, 0]


def test_training_windows_score_every_position():
    stream = torch.arange(10)
    batches = training_windows(stream, seq_len=3, batch_size=2)
    assert [b["input_ids"].tolist() for b in batches] == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8]]]
    assert batches[0]["targets"].tolist() == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="longer than the model's max positions 2"):
        training_windows(stream, 3, 2, max_positions=2)


def test_sliding_windows_score_each_token_once_with_context():
    stream = torch.arange(10, 20)
    batches = sliding_windows(stream, context_len=4, stride=2, batch_size=8)
    (batch,) = batches
    ids, targets = batch["input_ids"], batch["targets"]
    x = IGNORE_INDEX
    assert ids.tolist() == [[10, 11, 12, 13], [12, 13, 14, 15], [14, 15, 16, 17], [16, 17, 18, 19]]
    # position t predicts the next stream token, the window's last position too
    assert targets.tolist() == [[11, 12, 13, 14], [x, x, 15, 16], [x, x, 17, 18], [x, x, 19, x]]
    scored = targets[targets != x]
    assert sorted(scored.tolist()) == list(range(11, 20))  # every token but the first, once
    ragged = sliding_windows(torch.arange(7), context_len=4, stride=4, batch_size=2)[0]
    assert ragged["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert ragged["targets"].tolist() == [[1, 2, 3, 4], [5, 6, x, x]]  # disjoint: no token lost
    with pytest.raises(ValueError, match="stride must be in"):
        sliding_windows(stream, 4, 5, 1)


def test_prepare_data_on_the_embedded_corpus(tmp_path):
    data = prepare_data("embedded", tokenizer="bpe:512", seq_len=64, batch_size=4, cache_dir=tmp_path)
    assert len(data.tokenizer) <= 512 and data.conditions["dataset"] == "embedded:pydoc_data.topics"
    assert data.train[0]["input_ids"].shape == (4, 64)
    assert all(int(b["input_ids"].max()) < len(data.tokenizer) for b in data.train + data.test)
    with pytest.raises(ValueError, match="longer than the model's max positions 32"):
        prepare_data("embedded", tokenizer="bpe:512", seq_len=64, cache_dir=tmp_path, max_positions=32)
    with pytest.raises(ValueError, match="tokenizer vocab 512 exceeds the model's vocab size 256"):
        prepare_data("embedded", tokenizer="bpe:512", seq_len=64, cache_dir=tmp_path, model_vocab_size=256)


def test_held_out_validation_batches_leave_the_rest_untouched(tmp_path):
    data = prepare_data("embedded", tokenizer="bpe:512", seq_len=64, batch_size=4, cache_dir=tmp_path)
    batches = len(data.validation)
    kept, held = hold_out_validation(data, 3)
    assert len(held) == 3 and len(kept.validation) == batches - 3
    assert all(a is b for a, b in zip(kept.validation + held, data.validation))
    assert kept.train is data.train and kept.test is data.test and kept.conditions["validation_batches_held_out"] == 3
    assert hold_out_validation(data, 0) == (data, [])
    with pytest.raises(ValueError, match=f"cannot hold out {batches} of the validation split's {batches} batches"):
        hold_out_validation(data, batches)
    with pytest.raises(ValueError, match="non-negative integer, got -1"):
        hold_out_validation(data, -1)


def test_a_single_text_file_is_cut_in_order_at_line_boundaries(tmp_path, text):
    path = tmp_path / "book.txt"
    path.write_text(text)
    first, again = load_corpus(path), load_corpus(str(path))
    assert first.splits == again.splits  # deterministic
    parts = [first.splits[split] for split in ("train", "validation", "test")]
    assert all(len(part) == 1 for part in parts)
    assert "".join(part[0] for part in parts) == path.read_text()  # disjoint, in order, nothing lost
    assert all(part[0].endswith("\n") for part in parts[:2])  # cut after a line end
    shares = [len(part[0]) / len(text) for part in parts]
    assert shares[0] == pytest.approx(0.9, abs=0.02) and shares[1] == pytest.approx(0.05, abs=0.02)
    assert first.notes == (
        "one file book.txt: train / validation / test = consecutive 90/5/5% of its characters, cut at line boundaries",
    )
    folder = tmp_path / "only"
    folder.mkdir()
    (folder / "corpus.txt").write_text(text)
    assert load_corpus(folder).splits == first.splits  # a folder holding one file reads as that file


def test_a_single_jsonl_file_of_documents_is_cut_at_document_boundaries(tmp_path, text):
    import json

    docs = [text[i : i + 300] for i in range(0, 30 * 300, 300)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    corpus = load_corpus(path)
    parts = [corpus.splits[split] for split in ("train", "validation", "test")]
    assert [d for part in parts for d in part] == docs and [len(p) for p in parts] == [27, 2, 1]
    assert corpus.notes[0].endswith("cut at document boundaries")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one line only\n")
    with pytest.raises(ValueError, match="the file is too small to split"):
        load_corpus(tiny)
    with pytest.raises(ValueError, match="is not a corpus file"):
        (tmp_path / "notes.md").write_text(text)
        load_corpus(tmp_path / "notes.md")


def test_a_folder_without_a_tokenizer_is_refused_by_name(tmp_path):
    from cascade_bench.data.tokenization import has_tokenizer_files, load_tokenizer

    (tmp_path / "config.json").write_text("{}")  # a model folder saved without its tokenizer
    assert not has_tokenizer_files(tmp_path)
    with pytest.raises(ValueError, match="holds no tokenizer .*tokenizer.save_pretrained"):
        load_tokenizer(str(tmp_path))
