"""tools/device-check, the prepared script for a GPU lease: what can be checked without a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "device-check"


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_the_wheel_step_finds_the_locked_transformers_for_the_device_python():
    # the same pattern the script's --wheels step reads requirements.lock with
    pattern = re.search(r'sed -n "(s/.*/p)" requirements\.lock', SCRIPT.read_text()).group(1)
    found = subprocess.run(["sed", "-n", pattern, str(ROOT / "requirements.lock")], capture_output=True, text=True)
    assert re.fullmatch(r"\d+\.\d+\.\d+\n", found.stdout)


def test_an_unknown_step_is_named_and_fails(tmp_path):
    env = {**os.environ, "DEVICE": "cpu", "PYTHON": sys.executable, "STEPS": "tests-typo", "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert "unknown step 'tests-typo'" in done.stderr
    assert "torch" in (tmp_path / "environment.txt").read_text()
