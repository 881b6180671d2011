"""The documentation site: every guide is in the nav, every link resolves, the README stays short.

CI builds the site itself with ``mkdocs build --strict`` (the ``docs`` extra); this test needs only
the files, so it runs everywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _nav_pages() -> list[str]:
    return re.findall(r":\s*([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)


def test_every_page_of_the_nav_exists_and_every_guide_is_in_it():
    nav = _nav_pages()
    assert len(nav) == len(set(nav))
    assert [page for page in nav if not (DOCS / page).is_file()] == []
    guides = sorted(path.name for path in DOCS.glob("*.md"))
    assert sorted(nav) == guides  # generated tables under docs/tables/ are linked from the pages, not the nav


def test_every_relative_link_resolves():
    broken = []
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_the_readme_is_short_and_starts_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    assert "cascade-bench run" in blocks[0] and blocks[1].strip() == "python -m pytest --benchmark-disable"
