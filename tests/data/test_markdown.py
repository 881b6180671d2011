"""The one Markdown table formatter: layout, alignment, and a clear error for a ragged row."""

from __future__ import annotations

import pytest

from cascade_bench.data.markdown import markdown_table


def test_a_table_is_its_header_a_rule_and_one_line_per_row():
    assert markdown_table(["a", "b"], [[1, "x"], [2.5, ""]]) == "| a | b |\n| --- | --- |\n| 1 | x |\n| 2.5 |  |"
    assert markdown_table(["n", "v"], [], right=[False, True]) == "| n | v |\n| --- | ---: |"


def test_a_row_of_another_width_names_itself():
    with pytest.raises(ValueError, match=r"a row of 1 cells in a table of 2 columns: \['1'\]"):
        markdown_table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="1 alignments for 2 columns"):
        markdown_table(["a", "b"], [], right=[True])
