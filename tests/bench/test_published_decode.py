"""The published decoding table and the README's figures come from the published JSON: the
Markdown is exactly what bench-decode writes from it, and every README figure is in it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cascade_bench.bench.decode_run import format_decode_tables
from cascade_bench.bench.decode_suite import DecodeRow

ROOT = Path(__file__).resolve().parents[2]
JSON = ROOT / "docs/results/smollm2-135m-decode.json"
#: Every published bench-decode record (the suite's, and the trained exits' run).
PUBLISHED = sorted((ROOT / "docs/results").glob("*-decode*.json"))


def _rows(path: Path = JSON):
    payload = json.loads(path.read_text())
    rows = [DecodeRow(**{**r, "speedup_interval": tuple(r["speedup_interval"])}) for r in payload["rows"]]
    return rows, payload["conditions"]


def test_both_published_decoding_records_are_checked():
    assert [p.name for p in PUBLISHED] == ["smollm2-135m-decode-trained-exits.json", "smollm2-135m-decode.json"]


@pytest.mark.parametrize("path", PUBLISHED, ids=lambda p: p.name)
def test_the_published_tables_are_what_bench_decode_writes_from_the_json(path):
    rows, conditions = _rows(path)
    assert path.with_suffix(".md").read_text() == format_decode_tables(rows, conditions)


def test_the_readme_s_decoding_figures_are_the_json_s_whole_suite_rows():
    rows, _ = _rows()
    suite = {r.method: r for r in rows if r.prompt_set == "all" and r.batch_size == 1}
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## What speeds up decoding") : readme.index("## Ten lines of Python")]
    for label, method in [
        ("ours, prompt lookup (2 tokens a round)", "ours-lookup"),
        ("ours, prompt lookup + a draft distilled from SmolLM2 here", "ours-lookup+draft"),
        ("Hugging Face prompt lookup (10 tokens)", "hf-prompt-lookup"),
        ("Hugging Face assisted generation, the same draft", "hf-assisted"),
    ]:
        row = suite[method]
        low, high = row.speedup_interval
        line = f"| {label} | {row.tokens_per_s:.1f} | {row.speedup:.2f}x ({low:.2f}-{high:.2f}) |"
        assert line in section, line
    plain = re.search(r"\| plain greedy, ours \(the baseline\) / Hugging Face's \| (\S+) / (\S+) \|", section)
    assert plain.groups() == (f"{suite['ours-greedy'].tokens_per_s:.1f}", f"{suite['hf-greedy'].tokens_per_s:.1f}")
    assert all(r.same_tokens == 1.0 for r in rows if r.lossless)  # the README says every lossless row is
