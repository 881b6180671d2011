"""Is this the locked install? The lock file (``requirements.lock`` at the repository root) pins
every package the README's install command brings in, by exact version, for every Python and
platform (markers); a results file made on an install that differs from it is not the published
setting, and the run's conditions say so.

``pip install torch==2.13.0`` installs a local build (``2.13.0+cpu``): versions compare without
the local label, so a CPU or CUDA build of the locked release both match.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import Mapping, Optional

#: Where an editable install (a clone) keeps the lock: the repository root.
LOCK_NAME = "requirements.lock"
#: Installed distributions a lock does not pin: the installers themselves and the project.
UNLOCKED = frozenset({"pip", "setuptools", "wheel", "cascade-bench"})


def canonical_name(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    """The version without its local label (``2.13.0+cpu`` -> ``2.13.0``)."""
    return version.split("+", 1)[0]


def read_lock(text: str, environment: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """{canonical name: pinned version} of the ``name==version ; marker`` lines of a lock whose
    markers hold in ``environment`` (default: this interpreter). Comments and blank lines are
    skipped; a line that is not an exact pin is a ValueError naming it."""
    from packaging.requirements import InvalidRequirement, Requirement

    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as error:
            raise ValueError(f"lock line {number} is not a requirement: {raw!r} ({error})") from None
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            raise ValueError(f"lock line {number} is not an exact pin 'name==version': {raw!r}")
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        pins[canonical_name(requirement.name)] = specifiers[0].version
    return pins


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every distribution installed in this interpreter."""
    return {
        canonical_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]
    }


def lock_mismatches(pins: Mapping[str, str], installed: Mapping[str, str]) -> list[str]:
    """One line per installed distribution that the lock does not pin at its version (sorted by
    name); empty when the install is the locked one. Locked packages that are not installed are
    fine: markers or the torch build (CPU wheels need no CUDA libraries) leave some out."""
    problems = []
    for name in sorted(installed):
        if name in UNLOCKED:
            continue
        if name not in pins:
            problems.append(f"{name} {installed[name]} is installed but not in the lock")
        elif public_version(installed[name]) != public_version(pins[name]):
            problems.append(f"{name} {installed[name]} is installed; the lock pins {pins[name]}")
    return problems


def repository_lock() -> Optional[Path]:
    """The lock of the clone this package runs from (an editable install), or None."""
    path = Path(__file__).resolve().parents[2] / LOCK_NAME
    return path if path.is_file() else None


@functools.lru_cache(maxsize=None)
def lock_status(lock: Optional[Path] = None) -> str:
    """One phrase for a run's conditions: whether this install is the locked one (read once per
    process: installs do not change under a run)."""
    lock = lock or repository_lock()
    if lock is None or not lock.is_file():
        return f"no {LOCK_NAME} beside the package (not a clone): versions as recorded"
    problems = lock_mismatches(read_lock(lock.read_text()), installed_versions())
    if not problems:
        return f"matches {lock.name}"
    return f"{len(problems)} installed package(s) differ from {lock.name}"
