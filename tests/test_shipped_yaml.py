"""Every YAML file the repository ships loads with its own loader, so a new example is a test case."""

from __future__ import annotations

import os
from fnmatch import fnmatch
from pathlib import Path

import pytest

from abtest import config as traffic
from tests.deploy import compose_file, manifests
from tests.deploy.tools import promtool_check
from training.config import load_config
from training.task import load_task

REPO = Path(__file__).resolve().parents[1]
_NOT_SHIPPED = {"runs", "build", "dist", "__pycache__"}  # outputs and caches, never part of the repository


def _run_config(path: Path) -> None:
    load_task(load_config(path).task)


LOADERS = {
    "training/tasks/*.yaml": load_task,
    "training/examples/*.yaml": _run_config,
    "abtest/examples/*.yaml": traffic.load,
    "deploy/compose/compose.yaml": compose_file.validate,
    "deploy/compose/prometheus.yml": lambda path: promtool_check("config", path),
    "deploy/compose/traffic/*.yaml": traffic.load,
    "deploy/k8s/base/traffic.yaml": traffic.load,  # also checked as the ConfigMap it becomes
    "deploy/k8s/*.yaml": manifests.check,
}


def _shipped() -> list[Path]:
    found = []
    for folder, subfolders, files in os.walk(REPO):
        # Pruned while walking: a virtual environment inside the checkout holds thousands of files.
        subfolders[:] = [name for name in subfolders if not (name.startswith(".") or name in _NOT_SHIPPED or name.endswith(".egg-info"))]
        found += [(Path(folder) / name).relative_to(REPO) for name in files if name.endswith((".yaml", ".yml"))]
    return sorted(found)


@pytest.mark.parametrize("path", _shipped(), ids=str)
def test_shipped_yaml_loads(path):
    loaders = [loader for pattern, loader in LOADERS.items() if fnmatch(path.as_posix(), pattern)]
    assert loaders, f"{path} has no loader; add its glob and loader to LOADERS in {Path(__file__).name}"
    loaders[0](REPO / path)


def test_every_loader_covers_a_shipped_file():
    shipped = [path.as_posix() for path in _shipped()]
    assert all(any(fnmatch(path, pattern) for path in shipped) for pattern in LOADERS)
