"""Published figures are the stored records of their runs, not hand-copied numbers (the default run
and the SmolLM2 run, each with its records in docs/results/<run>.jsonl and its blocks beside them).

``docs/results/ashem-embedded.jsonl`` holds the records a fresh clone's ``cascade-bench run``
wrote (the run the README quotes). ``cascade-bench report --pages docs/results/ashem-embedded``
wrote the tables the site's pages include (``experiment.published``) from those records; they must
be exactly what the command writes from them now, the pages must include them, and the README's
copy of the quality table (GitHub renders no includes) must match it line for line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade_bench.experiment.published import published_blocks
from cascade_bench.experiment.records import Record
from cascade_bench.experiment.results_store import ResultsStore

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "results" / "ashem-embedded.jsonl"
#: Per published run (records in docs/results/<run>.jsonl, blocks in docs/results/<run>/): which page
#: includes which of its blocks.
INCLUDED = {
    "ashem-embedded": {
        "docs/results.md": ("quality", "wall", "wall_flops", "checks", "kv"),
        "docs/exit-rules.md": ("rules", "risk"),
    },
    "smollm2-135m": {"docs/pretrained-smollm2.md": ("quality", "wall", "wall_flops", "rules", "risk", "kv", "checks")},
    "gemma3-270m": {"docs/pretrained-gemma3.md": ("quality", "wall", "wall_flops", "rules", "risk", "kv", "checks")},
}


def _records(run: str) -> list[Record]:
    return list(ResultsStore(ROOT / "docs" / "results" / f"{run}.jsonl"))


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return list(ResultsStore(RECORDS))


def test_the_stored_run_is_the_default_config_on_the_locked_install(records):
    from cascade_bench.experiment.config import ExperimentConfig

    default = {k: v for k, v in ExperimentConfig().as_dict().items() if k != "out"}
    for record in records:
        conditions = record.conditions
        stored = {k: v for k, v in conditions["config"].items() if k != "out"}
        assert stored == default, "the stored run is not the default config: rerun it and store its records"
        if record.method == "oracle" and "install" not in conditions:
            continue  # the oracle's record carries no environment before ff54488's successor (analytic only)
        assert conditions["install"] == "matches requirements.lock"
        assert not conditions["git_commit"].endswith("+dirty")


@pytest.mark.parametrize("run", sorted(INCLUDED))
def test_the_published_blocks_are_what_the_command_writes_from_the_stored_run(run):
    expected = published_blocks(_records(run))
    blocks = ROOT / "docs" / "results" / run
    assert sorted(path.stem for path in blocks.glob("*.md")) == sorted(expected)
    for name, text in expected.items():
        assert (blocks / f"{name}.md").read_text() == text.rstrip("\n") + "\n", (
            f"{run}/{name}.md is not what `cascade-bench report --pages` writes from {run}.jsonl: rerun it"
        )


@pytest.mark.parametrize(
    "run, page, block",
    [(run, page, block) for run, pages in INCLUDED.items() for page, blocks in pages.items() for block in blocks],
)
def test_the_pages_include_the_published_blocks(run, page, block):
    assert f'--8<-- "docs/results/{run}/{block}.md"' in (ROOT / page).read_text()


def test_the_readme_quotes_the_paper_table(records):
    text = (ROOT / "README.md").read_text()
    missing = [line for line in published_blocks(records)["paper"].splitlines() if line not in text]
    assert not missing, f"README.md's paper table differs from {RECORDS.name}; first missing line: {missing[0]}"


@pytest.mark.parametrize(
    "record", sorted((ROOT / "docs" / "results").glob("*.exit_recipes.json")), ids=lambda p: p.name
)
def test_the_published_exit_recipe_tables_are_what_train_exits_writes_from_the_record(record, tmp_path):
    from cascade_bench.experiment.exit_recipe_study import rewrite_recipe_outputs

    copy = tmp_path / record.name
    copy.write_text(record.read_text())
    written = rewrite_recipe_outputs(copy, tmp_path)
    for key in ("table", "summary"):
        published = record.parent / written[key].name
        assert published.read_text() == written[key].read_text(), f"{published.name}: rerun train-exits --tables-from"
    name = record.name.removesuffix(".json")
    page = "pretrained-gemma3.md" if name.startswith("gemma3") else "pretrained-smollm2.md"  # the model's page
    for table in (name, name.replace(".exit_recipes", ".exit_recipes_summary")):
        assert f'--8<-- "docs/results/{table}.md"' in (ROOT / "docs" / page).read_text(), (table, page)
