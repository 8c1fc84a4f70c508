"""deploy/k8s: both overlays render with kustomize, every resource is valid for Kubernetes 1.37
(the ServiceMonitor against its own schema), and the pieces fit: probes, router replicas and its
disruption budget, the hot-reloaded traffic split, secrets, scraping, and vLLM's flags."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from abtest import config as traffic
from abtest.router import ConfigHolder
from monitoring.metrics import RouterMetrics
from tests.deploy import manifests
from tests.deploy.engine_flags import VLLM_IMAGE, check_vllm_behind_server, flags
from tests.deploy.manifests import K8S_DIR, OVERLAYS

SECRET = "stillhouse"  # created by hand (deploy/README.md), never shipped


def _by_kind(resources) -> dict[tuple[str, str], dict]:
    return {(resource["kind"], resource["metadata"]["name"]): resource for resource in resources}


def _pod(resources, deployment: str) -> dict:
    return _by_kind(resources)[("Deployment", deployment)]["spec"]["template"]


def _container(pod: dict, name: str) -> dict:
    spec = pod["spec"]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


@pytest.fixture(scope="module", params=OVERLAYS, ids=lambda path: path.name)
def rendered(request) -> tuple[dict, ...]:
    return manifests.render(request.param)


def test_every_resource_is_valid(rendered):
    assert [problem for resource in rendered for problem in manifests.problems(resource)] == []


def test_the_validators_refuse_unknown_fields(rendered):
    deployment = copy.deepcopy(_by_kind(rendered)[("Deployment", "stillhouse-router")])
    deployment["spec"]["replica"] = 2
    assert manifests.problems(deployment)
    monitor = copy.deepcopy(_by_kind(rendered)[("ServiceMonitor", "stillhouse")])
    monitor["spec"]["endpoints"][0]["scrape_interval"] = "15s"
    assert manifests.problems(monitor)


def test_servers_answer_health_probes(rendered):
    for deployment in ("stillhouse-server", "stillhouse-router"):
        pod = _pod(rendered, deployment)
        for container in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
            if container.get("ports"):
                port = container["ports"][0]["name"]
                for probe in ("readinessProbe", "livenessProbe"):
                    assert container[probe]["httpGet"] == {"path": "/health", "port": port}, (deployment, container["name"], probe)


def test_router_replicas_and_disruption_budget(rendered):
    router = _by_kind(rendered)[("Deployment", "stillhouse-router")]
    budget = _by_kind(rendered)[("PodDisruptionBudget", "stillhouse-router")]
    assert router["spec"]["replicas"] == 2
    assert budget["spec"]["selector"] == router["spec"]["selector"]
    assert 1 <= budget["spec"]["minAvailable"] < router["spec"]["replicas"]


def test_router_hot_reloads_the_traffic_split_configmap(rendered, tmp_path):
    pod = _pod(rendered, "stillhouse-router")
    router = _container(pod, "router")
    config = Path(flags(router["args"])["config"])
    [mount] = [m for m in router["volumeMounts"] if m["mountPath"] == config.parent.as_posix()]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    configmap = _by_kind(rendered)[("ConfigMap", volume["configMap"]["name"])]  # no name hash: edits apply in place
    (tmp_path / config.name).write_text(configmap["data"][config.name])
    split = traffic.load(tmp_path / config.name)
    services = {name for kind, name in _by_kind(rendered) if kind == "Service"}
    upstreams = {split.default_upstream, *(arm.upstream for route in split.routes.values() for arm in route.arms.values())}
    assert upstreams == {"http://stillhouse-server:8080"} and "stillhouse-server" in services


def _configmap_volume(folder: Path, files: dict[str, str], version: int) -> None:
    """Write ``files`` as the kubelet updates a ConfigMap volume: a new folder, then one symlink swapped atomically."""
    data = folder / f"..{version}"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(Path("..data") / name)
    (folder / "..data_tmp").symlink_to(data.name)
    os.replace(folder / "..data_tmp", folder / "..data")


def test_router_reloads_a_configmap_update(rendered, tmp_path):
    text = next(r for r in rendered if r["kind"] == "ConfigMap")["data"]["traffic.yaml"]
    _configmap_volume(tmp_path, {"traffic.yaml": text}, 1)
    holder = ConfigHolder(tmp_path / "traffic.yaml", RouterMetrics())
    before = holder.config.version_hash
    _configmap_volume(tmp_path, {"traffic.yaml": text.replace("weight: 0", "weight: 10")}, 2)
    assert holder.poll() and holder.config.version_hash != before
    assert holder.config.routes["sentiment"].arms["student"].weight == 10


def test_request_log_and_tokens_come_from_the_secret(rendered):
    for deployment, container in (("stillhouse-server", "server"), ("stillhouse-router", "router")):
        spec = _container(_pod(rendered, deployment), container)
        env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in spec["env"]}
        assert flags(spec["args"])["request-log"] == "$(STILLHOUSE_REQUEST_LOG)"
        assert env["STILLHOUSE_REQUEST_LOG"] == {"name": SECRET, "key": "request-log-url"}
        assert env["STILLHOUSE_ADMIN_TOKEN"] == {"name": SECRET, "key": "admin-token"}
    assert not [r for r in rendered if r["kind"] == "Secret"], "secrets are created in the cluster, not shipped"


def test_prometheus_scrapes_both_jobs(rendered):
    resources = _by_kind(rendered)
    monitor = resources[("ServiceMonitor", "stillhouse")]
    # Prometheus Operator names the job after the Service: the job names the rules and dashboards expect.
    for job in ("stillhouse-server", "stillhouse-router"):
        service = resources[("Service", job)]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert {p["name"] for p in service["spec"]["ports"]} >= {e["port"] for e in monitor["spec"]["endpoints"]}
        pod = _pod(rendered, job)
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        annotations = pod["metadata"]["annotations"]
        ports = {str(p["containerPort"]) for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] in ports


def test_gpu_overlay_runs_vllm_beside_the_server():
    pod = _pod(manifests.render(K8S_DIR / "overlays" / "gpu"), "stillhouse-server")
    vllm, server = _container(pod, "vllm"), _container(pod, "server")
    serve = flags(server["args"])
    check_vllm_behind_server(flags(vllm["args"]), serve, {e["name"]: e["value"] for e in vllm["env"]})
    assert serve["profile"] == "strict" and vllm["image"] == VLLM_IMAGE
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    # A native sidecar: the server starts once vLLM's startup probe passes.
    assert vllm["restartPolicy"] == "Always" and vllm["startupProbe"]["httpGet"]["path"] == "/health"
    home = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}["home"]
    assert {"name": "home", "mountPath": home, "readOnly": True} in vllm["volumeMounts"]
    assert serve["registry"].startswith(home + "/"), "vLLM reads adapters at the server's registry path"


def test_cpu_overlay_runs_the_embedded_engine_without_a_gpu():
    resources = manifests.render(K8S_DIR / "overlays" / "cpu")
    pod = _pod(resources, "stillhouse-server")
    assert flags(_container(pod, "server")["args"])["engine"] == "torch"
    assert "nvidia.com/gpu" not in str(resources) and not pod["spec"].get("initContainers")
