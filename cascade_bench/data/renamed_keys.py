"""Keys renamed since an earlier release, read once from what was stored under the old name.

Stored files outlive a rename: a run config, the config a results file records, a saved cascade's
manifest. Each is read through :func:`read_renamed` at the one place it is loaded, which renames the
old key with a ``FutureWarning`` that names the file and the new key; nothing past the loader knows
the old names. ``RENAMED`` lists them, old -> new.
"""

from __future__ import annotations

import warnings
from typing import Mapping

#: old key -> new key (one name per concept: "exit rule", not "exit function").
RENAMED: dict[str, str] = {"exit_fn": "exit_rule"}
#: old run-config table -> new table (each table is named as its section is, and none as a key is).
RENAMED_TABLES: dict[str, str] = {"model": "stages", "exit_rules": "exits", "risk": "risk_control"}


def read_renamed_tables(raw: Mapping, source: str) -> dict:
    """A parsed run config with every old table of ``RENAMED_TABLES`` under its new name (a warning
    naming ``source``), and the renamed keys in it and in each table read as ``read_renamed`` does."""
    tables = {}
    for name, value in read_renamed(raw, source).items():
        if not isinstance(value, Mapping):
            tables[name] = value
            continue
        new = RENAMED_TABLES.get(name, name)
        if new != name:
            if new in raw:
                raise ValueError(f"{source}: holds both the table [{name}] and its new name [{new}]; keep [{new}] only")
            warnings.warn(
                f"{source}: the table [{name}] is now called [{new}]; read as [{new}]. Rename it there: "
                f"the old name will not be read in a later release.",
                FutureWarning,
                stacklevel=2,
            )
        tables[new] = read_renamed(value, f"{source} [{new}]")
    return tables


def read_renamed(values: Mapping, source: str, warn: bool = True) -> dict:
    """``values`` with every old key of ``RENAMED`` under its new name. A file holding both names is
    refused (ValueError naming both); each old name read warns once per call, naming ``source``
    (``warn=False``: the caller warns once for many, e.g. every line of a results file)."""
    renamed = dict(values)
    for old, new in RENAMED.items():
        if old not in renamed:
            continue
        if new in renamed:
            raise ValueError(f"{source}: holds both {old!r} and its new name {new!r}; keep {new!r} only")
        renamed[new] = renamed.pop(old)
        if not warn:
            continue
        warnings.warn(
            f"{source}: key {old!r} is now called {new!r}; read as {new} = {renamed[new]!r}. "
            f"Rename it there: the old name will not be read in a later release.",
            FutureWarning,
            stacklevel=2,
        )
    return renamed
