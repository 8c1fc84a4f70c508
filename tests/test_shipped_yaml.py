"""Every YAML file the repository ships loads with its own loader, so a new example is a test case."""

from __future__ import annotations

import os
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from abtest import config as traffic
from tests.binaries import promtool
from tests.deploy import compose_file, manifests
from training import teacher_compare
from training.config import EndpointConfig, load_config
from training.task import load_task
from training.teacher_variant import TeacherVariant

REPO = Path(__file__).resolve().parents[1]
_NOT_SHIPPED = {"runs", "build", "dist", "__pycache__"}  # outputs and caches, never part of the repository


def _run_config(path: Path) -> None:
    load_task(load_config(path).task)


def _teacher_variants(path: Path) -> None:
    teacher_compare.resolve(teacher_compare.load_variants(path), TeacherVariant(), EndpointConfig(url="http://127.0.0.1:8080"), load_task("demo"))


def _promtool(*command: str):
    return lambda path: promtool(*command, path)


def _grafana_provisioning(key: str):
    def check(path: Path) -> None:
        document = yaml.safe_load(path.read_text())
        assert document["apiVersion"] == 1 and document[key], f"{path}: a Grafana provisioning file lists {key}"
    return check


LOADERS = {
    "training/tasks/*.yaml": load_task,
    "training/examples/*-variants.yaml": _teacher_variants,
    "training/examples/*.yaml": _run_config,
    "abtest/examples/*.yaml": traffic.load,
    "monitoring/prometheus/prometheus.yml": _promtool("check", "config"),
    "monitoring/prometheus/rules/*.rules.yml": _promtool("check", "rules"),
    "monitoring/prometheus/tests/*.test.yml": _promtool("test", "rules"),
    "monitoring/grafana/provisioning/datasources/*.yml": _grafana_provisioning("datasources"),
    "monitoring/grafana/provisioning/dashboards/*.yml": _grafana_provisioning("providers"),
    "deploy/compose/compose.yaml": compose_file.validate,
    "deploy/compose/prometheus.yml": _promtool("check", "config"),
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
