"""The tables of one run that the documentation includes, written from its stored records.

``cascade-bench report --pages DIR`` writes each block below to ``DIR/<block>.md`` (atomically), and
the site's pages include them (``--8<--`` snippets), so a published table is whatever the command
wrote from the records, never a hand copy:

- ``quality``: the paper table without its wall-time column (deterministic: a rerun of the same
  config on the same install gives the same digits);
- ``wall``: the paper table's wall ratios (timings: a rerun gives other digits);
- ``checks``: the plausibility checks, as ``run`` prints them;
- ``wall_flops``: routed early exit's wall ratio against its FLOP ratio on the same timed batches,
  per swept hard ratio, with the medians (timings; absent in records without timed FLOPs);
- ``rules``, ``risk``, ``kv``: the exit-rule, risk-control and K/V-policy tables of ``<name>.report.md``
  (absent when the run has no such points).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..data.storage import write_text_atomic
from .checks import PLAUSIBLE_PPL, format_checks, run_checks, stored_config
from .frames import records_frame
from .records import Record
from .reports import kv_table, paper_table, risk_table, rules_table, to_markdown, wall_flops_table

#: Every block a run can publish, in page order.
PAGE_BLOCKS = ("quality", "wall", "wall_flops", "checks", "rules", "risk", "kv")


def published_blocks(records: Sequence[Record]) -> dict[str, str]:
    """Each block of ``PAGE_BLOCKS`` the records have, as the Markdown a page includes."""
    frame = records_frame(list(records))
    checks = run_checks(list(records), tuple(stored_config(records, "plausible_ppl", PLAUSIBLE_PPL)))
    paper, _ = paper_table(frame)
    blocks = {
        "quality": to_markdown(paper.drop(columns=["wall ratio"])),
        "wall": to_markdown(paper[["method", "wall ratio"]]),
        "checks": "```\n" + format_checks(checks) + "```",
    }
    tables = (
        ("wall_flops", wall_flops_table(frame)),
        ("rules", rules_table(frame)),
        ("risk", risk_table(frame)),
        ("kv", kv_table(frame)),
    )
    for name, table in tables:
        if table is not None and not table.empty:
            blocks[name] = to_markdown(table)
    return blocks


def write_published(records: Sequence[Record], folder: "Path | str") -> list[Path]:
    """Write every block of ``published_blocks`` to ``folder/<block>.md``; returns the paths."""
    folder = Path(folder)
    written = []
    for name, text in published_blocks(records).items():
        path = folder / f"{name}.md"
        write_text_atomic(path, text.rstrip("\n") + "\n")
        written.append(path)
    return written
