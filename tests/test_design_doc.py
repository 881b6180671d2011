"""The design document is in the repository, and what cites it points at sections that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sources() -> list[Path]:
    return [
        *ROOT.glob("cascade_bench/**/*.py"),
        *ROOT.glob("tests/**/*.py"),
        ROOT / "README.md",
        *ROOT.glob("docs/**/*.md"),
    ]


def test_citations_point_into_the_repository_at_sections_that_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", design, re.M)}
    assert sections == set(range(1, 7))
    cited, outside = set(), []
    for path in _sources():
        text = path.read_text()
        if path.name != "test_design_doc.py" and re.search(r"DESIGN(\.md)?\b", text):
            outside.append(str(path.relative_to(ROOT)))
        cited |= {int(n) for n in re.findall(r"docs/design\.md`? section (\d+)", text)}
    assert outside == []  # nothing points at a design document outside the repository
    assert cited and cited <= sections
