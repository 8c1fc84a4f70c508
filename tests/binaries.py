"""System programs the tests run for real: skip locally when one is missing, fail under CI (which installs them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PROMETHEUS_PACKAGE = "apt-get install prometheus (.ci/run does)"
CHROMIUM_PACKAGE = "apt-get install chromium (.ci/run does)"


def require(binary: str, install: str) -> str:
    """The path of ``binary``; without it the test is skipped, or fails when CI=true (CI must never skip it)."""
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not installed: {install}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def promtool(*command: str | Path) -> str:
    """Run ``promtool COMMAND...`` and return its output; fails with promtool's own report."""
    result = subprocess.run([require("promtool", PROMETHEUS_PACKAGE), *map(str, command)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(map(str, command))}:\n{result.stdout}{result.stderr}"
    return result.stdout
