"""The default run's published figures are the stored records of that run, not hand-copied numbers.

``docs/results/ashem-embedded.jsonl`` holds the records a fresh clone's ``cascade-bench run``
wrote (the run the README quotes). ``cascade-bench report --pages docs/results/ashem-embedded``
wrote the tables the site's pages include (``experiment.published``) from those records; they must
be exactly what the command writes from them now, the pages must include them, and the README's
copy of the quality table (GitHub renders no includes) must match it line for line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cascade_bench.experiment.published import published_blocks

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "results" / "ashem-embedded.jsonl"
BLOCKS = ROOT / "docs" / "results" / "ashem-embedded"
#: Which page includes which block.
INCLUDED = {"docs/results.md": ("quality", "wall", "checks", "kv"), "docs/exit-rules.md": ("rules", "risk")}


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


def test_the_published_blocks_are_what_the_command_writes_from_the_stored_run(records):
    expected = published_blocks(records)
    assert sorted(path.stem for path in BLOCKS.glob("*.md")) == sorted(expected)
    for name, text in expected.items():
        assert (BLOCKS / f"{name}.md").read_text() == text.rstrip("\n") + "\n", (
            f"{name}.md is not what `cascade-bench report --pages` writes from {RECORDS.name}: rerun it"
        )


@pytest.mark.parametrize("page, block", [(page, block) for page, blocks in INCLUDED.items() for block in blocks])
def test_the_pages_include_the_published_blocks(page, block):
    assert f'--8<-- "docs/results/ashem-embedded/{block}.md"' in (ROOT / page).read_text()


def test_the_readme_quotes_the_quality_table(records):
    text = (ROOT / "README.md").read_text()
    missing = [line for line in published_blocks(records)["quality"].splitlines() if line not in text]
    assert not missing, f"README.md's quality table differs from {RECORDS.name}; first missing line: {missing[0]}"
