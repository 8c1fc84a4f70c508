"""System programs the tests run for real (Debian packages .ci/run installs): skip locally when missing, fail under CI."""

from __future__ import annotations

import os
import shutil

import pytest


def require(binary: str, package: str) -> str:
    """The path of ``binary``; without it the test is skipped, or fails when CI=true (CI must never skip it)."""
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not installed: `apt-get install {package}` (.ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
