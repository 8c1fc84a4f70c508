"""deploy/k8s: overlays rendered by kustomize, each resource validated offline.

Built-in kinds are checked by kubernetes-validate against the Kubernetes 1.37 schemas in strict
mode (unknown fields refused). The ServiceMonitor is a Prometheus Operator CRD those schemas do
not hold: it is checked against ``SERVICE_MONITOR``, the part of its CRD schema we use.
"""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from tests.deploy.tools import kubectl

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "deploy" / "k8s"
OVERLAYS = sorted(path.parent for path in (K8S_DIR / "overlays").glob("*/kustomization.yaml"))
KUBERNETES_VERSION = "1.37.0"

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "properties": {"matchLabels": _LABELS}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": r"^(\d+(ms|s|m|h))+$"},
                        },
                    },
                },
            },
        },
    },
}
CUSTOM_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR}


@cache
def render(folder: Path) -> tuple[dict, ...]:
    """The resources ``kubectl kustomize FOLDER`` prints."""
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize {folder.relative_to(REPO)} failed:\n{result.stderr}"
    assert "deprecated" not in result.stderr, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def problems(resource: dict) -> list[str]:
    """Why ``resource`` is not a valid object of its kind (empty when it is)."""
    name = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
    custom = CUSTOM_SCHEMAS.get((resource.get("apiVersion"), resource.get("kind")))
    if custom is not None:
        return [f"{name} {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft202012Validator(custom).iter_errors(resource)]
    try:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
        return [f"{name}: {error}"]
    return []


def folders(root: Path) -> set[Path]:
    """``root`` and every kustomization folder it builds from (resources and components that are folders)."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    found = {root}
    for entry in kustomization.get("resources", []) + kustomization.get("components", []):
        if (root / entry).is_dir():
            found |= folders((root / entry).resolve())
    return found


def check(path: Path) -> None:
    """Loader for shipped Kubernetes files: every overlay built from its folder renders to valid resources."""
    overlays = [overlay for overlay in OVERLAYS if Path(path).parent.resolve() in folders(overlay)]
    assert overlays, f"{path} is in no overlay's build: list it in a kustomization.yaml under deploy/k8s"
    for overlay in overlays:
        found = [problem for resource in render(overlay) for problem in problems(resource)]
        assert not found, f"{overlay.relative_to(REPO)}:\n" + "\n".join(found)
