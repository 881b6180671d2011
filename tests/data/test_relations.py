"""The one-to-one relation of the reversal-curse evaluation (HTML entities, from the standard library)."""

from __future__ import annotations

import pytest

from cascade_bench.data.relations import entity_pairs, statement


def test_the_relation_is_one_to_one_and_real():
    pairs = entity_pairs()
    assert len(pairs) == 252  # HTML 4's entities
    assert len({name for name, _ in pairs}) == len({point for _, point in pairs}) == len(pairs)
    assert ("eacute", 233) in pairs and chr(dict(pairs)["euro"]) == "\u20ac"


def test_statements_state_the_relation_both_ways():
    assert statement("eacute", 233, "forward") == ("The HTML entity eacute is code point", " 233.")
    assert statement("eacute", 233, "backward") == ("Code point 233 is the HTML entity", " eacute.")
    with pytest.raises(ValueError, match="direction must be one of"):
        statement("eacute", 233, "sideways")
