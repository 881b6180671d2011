"""The default run's published figures (README.md, docs/results.md) are the stored records of that run,
not hand-copied numbers.

``docs/results/ashem-embedded.jsonl`` holds the records a fresh clone's ``cascade-bench run``
wrote (the run the README quotes). The paper table is rebuilt from them exactly as ``report.md``
builds it; its deterministic columns (everything but wall time) and the checks printed at the end
of the run must appear in docs/results.md as they are (the quality table in README.md too), and so must
the wall ratios of that run, which a rerun does not reproduce (they are timings) but which must still
be the stored ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cascade_bench.experiment.checks import format_checks, run_checks
from cascade_bench.experiment.reports import paper_table, records_frame, to_markdown

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "results" / "ashem-embedded.jsonl"


def published_tables(records: list[dict]) -> dict[str, str]:
    """The Markdown blocks the README quotes from one default run's records."""
    paper, _ = paper_table(records_frame(records))
    return {
        "quality and cost": to_markdown(paper.drop(columns=["wall ratio"])),
        "wall time": to_markdown(paper[["method", "wall ratio"]]),
        "checks": format_checks(run_checks(records)),
    }


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]


def test_the_stored_run_is_the_default_config_on_the_locked_install(records):
    from cascade_bench.experiment.config import ExperimentConfig

    default = {k: v for k, v in ExperimentConfig().as_dict().items() if k != "out"}
    for record in records:
        conditions = record["conditions"]
        stored = {k: v for k, v in conditions["config"].items() if k != "out"}
        assert stored == default, "the stored run is not the default config: rerun it and store its records"
        if record["method"] == "oracle" and "install" not in conditions:
            continue  # the oracle's record carries no environment before ff54488's successor (analytic only)
        assert conditions["install"] == "matches requirements.lock"
        assert not conditions["git_commit"].endswith("+dirty")


@pytest.mark.parametrize(
    "page, block",
    [
        ("README.md", "quality and cost"),
        ("docs/results.md", "quality and cost"),
        ("docs/results.md", "wall time"),
        ("docs/results.md", "checks"),
    ],
)
def test_the_published_pages_quote_the_stored_run(records, page, block):
    text = (ROOT / page).read_text()
    expected = published_tables(records)[block]
    missing = [line for line in expected.strip().splitlines() if line.strip() and line not in text]
    assert not missing, f"{page}'s {block} block differs from {RECORDS.name}; first missing line: {missing[0]}"
