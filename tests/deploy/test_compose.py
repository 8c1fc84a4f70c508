"""deploy/compose: the Compose Specification, every variable documented, every mount present, the
vLLM flags the strict servability profile implies, and a Prometheus config promtool accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy import compose_file
from tests.deploy.compose_file import COMPOSE_DIR, COMPOSE_FILE, ENV_EXAMPLE, REPO
from tests.deploy.engine_flags import VLLM_IMAGE, check_vllm_behind_server, flags
from tests.binaries import promtool

# Written by the monitoring package; the Compose file mounts them by these paths.
MONITORING_MOUNTS = {
    "monitoring/prometheus/rules",
    "monitoring/grafana/provisioning/datasources",
    "monitoring/grafana/provisioning/dashboards",
    "monitoring/dashboards/json",
}
# Read by the Compose CLI itself, not by compose.yaml.
CLI_VARIABLES = {"COMPOSE_PROFILES"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return compose_file.loaded(compose_file.example_env())


def _binds(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume of ``service`` in short syntax."""
    return [tuple(volume.split(":")[:2]) for volume in service.get("volumes", [])]


def test_compose_file_matches_the_compose_specification():
    compose_file.validate()


def test_the_schema_check_refuses_a_broken_service(compose):
    broken = {**compose, "services": {**compose["services"], "router": {**compose["services"]["router"], "port": ["8090"]}}}
    assert any("router" in error and "port" in error for error in compose_file.schema_errors(broken))


def test_every_variable_is_documented_in_env_example():
    used = set(compose_file.variables(COMPOSE_FILE.read_text()))
    documented = set(compose_file.env_file())
    assert used - documented == set(), f"add these to {ENV_EXAMPLE.name}, with a comment saying what they do"
    assert documented - used - CLI_VARIABLES == set(), f"{ENV_EXAMPLE.name} documents variables compose.yaml never reads"


def test_every_env_example_variable_sits_under_a_comment():
    undocumented, commented = [], False
    for line in ENV_EXAMPLE.read_text().splitlines():
        if not line.strip():
            commented = False
        elif line.lstrip().startswith("#"):
            commented = True
        elif not commented:
            undocumented.append(line.partition("=")[0])
    assert not undocumented, f"give these a comment in {ENV_EXAMPLE.name}: {undocumented}"


def test_secrets_must_be_set():
    blank = {name: "" for name, ops in compose_file.variables(COMPOSE_FILE.read_text()).items() if any("?" in op for op in ops)}
    assert {"STILLHOUSE_ADMIN_TOKEN", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"} <= set(blank)
    with pytest.raises(ValueError, match="set .* in .env"):
        compose_file.loaded({**compose_file.env_file(), **blank})


def test_every_mounted_repository_path_exists(compose):
    sources = {
        (COMPOSE_DIR / source).resolve().relative_to(REPO).as_posix()
        for service in compose["services"].values()
        for source, _ in _binds(service)
        if source.startswith(".")
    }
    build = {(COMPOSE_DIR / service["build"]["context"] / service["build"]["dockerfile"]).resolve()
             for service in compose["services"].values() if "build" in service}  # fmt: skip
    assert MONITORING_MOUNTS <= sources, "Prometheus and Grafana mount the monitoring package's files"
    assert [path for path in sources - MONITORING_MOUNTS if not (REPO / path).exists()] == []
    assert build == {REPO / "deploy" / "Dockerfile"}


def test_vllm_serves_what_the_strict_profile_admits(compose):
    vllm, server = compose["services"]["vllm"], compose["services"]["server"]
    serve = flags(server["command"])
    check_vllm_behind_server(flags(vllm["command"]), serve, vllm["environment"])
    assert serve["profile"] == "strict" and serve["engine-url"] == "http://vllm:8000"
    assert vllm["image"] == VLLM_IMAGE
    # The server names adapters to vLLM by their registry path: vLLM sees the registry there, read-only.
    registry = serve["registry"]
    assert ("registry", registry) in _binds(server)
    assert any(volume == f"registry:{registry}:ro" for volume in vllm["volumes"])
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_engines_are_profiles_and_everything_is_health_checked(compose):
    services = compose["services"]
    assert services["vllm"]["profiles"] == services["server"]["profiles"] == ["vllm"]
    assert services["lorax"]["profiles"] == ["lorax"]
    for name in ("vllm", "server", "lorax", "router"):
        assert any("/health" in part for part in services[name]["healthcheck"]["test"]), name
    assert all("healthcheck" in service for name, service in services.items() if name != "provision")
    assert services["router"]["depends_on"].keys() == {"postgres"}, "the router must start under either engine profile"
    for name in ("server", "router"):
        log = flags(services[name]["command"])["request-log"]
        assert re.fullmatch(r"postgresql://[^:]+:[^@]+@postgres:5432/\w+", log), log


def test_router_reads_the_mounted_traffic_file(compose):
    router = compose["services"]["router"]
    config = Path(flags(router["command"])["config"])
    [(source, target)] = _binds(router)
    assert config.parent.as_posix() == target, "mount the folder: an atomic rewrite replaces the file"
    split = yaml.safe_load((COMPOSE_DIR / source / config.name).read_text())
    upstreams = {split["default_upstream"], *(arm["upstream"] for route in split["routes"].values() for arm in route["arms"].values())}
    assert upstreams == {"http://server:8080"}


def test_prometheus_config_scrapes_both_jobs_and_loads_the_rules(compose, tmp_path):
    prometheus = compose["services"]["prometheus"]
    mounts = dict((target, source) for source, target in _binds(prometheus))
    config = yaml.safe_load((COMPOSE_DIR / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    assert {job["job_name"] for job in config["scrape_configs"]} >= {"stillhouse-server", "stillhouse-router"}
    [rules] = config["rule_files"]
    assert Path(rules).parent.as_posix() == "/etc/prometheus/rules" and mounts["/etc/prometheus/rules"].endswith("monitoring/prometheus/rules")
    # promtool reads the rule files too: point the glob at the mounted folder.
    local = {**config, "rule_files": [str(REPO / "monitoring" / "prometheus" / "rules" / Path(rules).name)]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(local))
    promtool("check", "config", tmp_path / "prometheus.yml")


def test_grafana_reads_provisioning_and_dashboards(compose):
    mounts = {target: source for source, target in _binds(compose["services"]["grafana"])}
    assert mounts["/var/lib/grafana/dashboards"].endswith("monitoring/dashboards/json")
    assert mounts["/etc/grafana/provisioning/datasources"].endswith("monitoring/grafana/provisioning/datasources")
    assert mounts["/etc/grafana/provisioning/dashboards"].endswith("monitoring/grafana/provisioning/dashboards")


def test_grafana_datasources_reach_the_compose_prometheus(compose):
    grafana = compose["services"]["grafana"]
    folder = REPO / "monitoring" / "grafana" / "provisioning" / "datasources"
    # Grafana interpolates $NAME / ${NAME} in provisioning files from its environment.
    datasources = [
        source
        for path in sorted(folder.glob("*.y*ml"))
        for source in compose_file.interpolate(yaml.safe_load(path.read_text()), grafana["environment"]).get("datasources", [])
    ]
    assert all(s["url"] == "http://prometheus:9090" for s in datasources if s.get("type") == "prometheus"), datasources
