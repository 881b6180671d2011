"""The install a fresh clone gets: the README's command, CI and the lock agree, and the
compatibility matrix tests exactly the lower bounds that pyproject.toml declares."""

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from cascade_bench.measure.lockfile import read_lock

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _lower_bounds() -> dict:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                bounds[requirement.name] = Version(spec.version)
    return bounds


def test_the_matrix_tests_the_declared_lower_bounds():
    script = (ROOT / "tools" / "compat-matrix").read_text()
    oldest = dict(re.findall(r'^OLDEST_(TORCH|TRANSFORMERS)="([^"]+)"', script, flags=re.M))
    bounds = _lower_bounds()
    assert Version(oldest["TORCH"]) == bounds["torch"]
    assert Version(oldest["TRANSFORMERS"]) == bounds["transformers"]


def test_readme_and_ci_install_from_the_lock_with_the_locked_torch():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    torch_pin = read_lock((ROOT / "requirements.lock").read_text())["torch"]
    for text in (readme, ci):
        assert re.search(rf"pip install (--quiet )?torch=={re.escape(torch_pin)}\b", text)
        assert '-c requirements.lock -e ".[test]"' in text
    assert "cascade-bench check-lock" in ci


def test_the_lock_satisfies_the_ranges():
    pins = read_lock((ROOT / "requirements.lock").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency but not in the lock"
        assert requirement.specifier.contains(pins[name]), f"lock pins {name}=={pins[name]} outside {requirement}"
