"""A one-to-one relation from data that ships with Python, as statements for the reversal-curse
evaluation: HTML entity names and the Unicode code points they stand for
(``html.entities.codepoint2name``, HTML 4's 252 entities; one name per code point and one code
point per name).

``forward`` states name -> code point ("The HTML entity eacute is code point 233."), ``backward``
the converse ("Code point 233 is the HTML entity eacute."). Each statement is a (prompt, answer)
pair: the answer (" 233." / " eacute.") is what the evaluation scores.
"""

from __future__ import annotations

from html.entities import codepoint2name

DIRECTIONS = ("forward", "backward")


def entity_pairs() -> list[tuple[str, int]]:
    """(entity name, code point) pairs, sorted by code point; ValueError if the relation is not one-to-one."""
    pairs = sorted(((name, point) for point, name in codepoint2name.items()), key=lambda pair: pair[1])
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError("html.entities.codepoint2name is not one-to-one in this Python: an entity name repeats")
    return pairs


def statement(name: str, point: int, direction: str) -> tuple[str, str]:
    """(prompt, answer) of one statement of the relation in ``direction`` (``DIRECTIONS``)."""
    if direction == "forward":
        return f"The HTML entity {name} is code point", f" {point}."
    if direction == "backward":
        return f"Code point {point} is the HTML entity", f" {name}."
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
