"""The tables of one run that the documentation includes, written from its stored records.

``cascade-bench report --pages DIR`` writes each block below to ``DIR/<block>.md`` (atomically), and
the site's pages include them (``--8<--`` snippets), so a published table is whatever the command
wrote from the records, never a hand copy:

- ``paper``: the whole paper table (the README quotes it);
- ``quality``: the paper table without its wall-time columns, with every quality figure's interval
  and the paired difference from full depth (deterministic: a rerun of the same config on the same
  install gives the same digits; records that predate intervals show none);
- ``wall``: the paper table's wall ratios with their intervals and the realisation columns (timings:
  a rerun gives other digits);
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

#: The paper table's columns that the clock decides (the ``wall`` block; the ``quality`` block is the rest).
TIMING_COLUMNS = ("wall ratio", "realised / FLOP-predicted", "realised / layer ideal")
#: Columns left out of a published table whose records predate intervals (every cell n/a).
UNMEASURED_WITHOUT_INTERVALS = ("PPL - full", "vs full")


def _any_value(column) -> bool:
    for cell in column:
        value = getattr(cell, "value", cell)
        if isinstance(value, float) and value == value or (isinstance(value, str) and value != "n/a"):
            return True
    return False


#: Every block a run can publish, in page order.
PAGE_BLOCKS = ("paper", "quality", "wall", "wall_flops", "checks", "rules", "risk", "kv")


def published_blocks(records: Sequence[Record]) -> dict[str, str]:
    """Each block of ``PAGE_BLOCKS`` the records have, as the Markdown a page includes."""
    frame = records_frame(list(records))
    checks = run_checks(list(records), tuple(stored_config(records, "plausible_ppl", PLAUSIBLE_PPL)))
    paper, _ = paper_table(frame)
    paper = paper.drop(columns=[c for c in UNMEASURED_WITHOUT_INTERVALS if not _any_value(paper[c])])
    timing = [c for c in TIMING_COLUMNS if c in paper]
    blocks = {
        "paper": to_markdown(paper),
        "quality": to_markdown(paper.drop(columns=timing)),
        "wall": to_markdown(paper[["method", *timing]]),
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
