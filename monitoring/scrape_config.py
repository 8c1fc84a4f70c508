"""The Prometheus configuration for one machine: the shipped file with the targets of a running stack.

``monitoring/prometheus/prometheus.yml`` names the scrape jobs (``monitoring.rules.JOBS``) and
loads the rules; `stillhouse up` and the tests run Prometheus on a copy with the ports they
started the server, the router and the watch on (``prometheus_command`` starts it).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from monitoring.rules import JOBS, RULES_PATH

SHIPPED = Path(__file__).parent / "prometheus" / "prometheus.yml"


def local_config(targets: dict[str, list[str]], scrape_interval: str = "5s") -> dict:
    """The shipped config with ``targets`` (job -> host:port list) and the rules by absolute path."""
    unknown = sorted(set(targets) - set(JOBS))
    if unknown:
        raise ValueError(f"unknown scrape jobs {unknown}; the rules and dashboards know {list(JOBS)}")
    config = yaml.safe_load(SHIPPED.read_text())
    config["global"] = {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval}
    config["rule_files"] = [str(RULES_PATH.parent / "*.rules.yml")]
    config["scrape_configs"] = [{"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in targets.items() if hosts]
    return config


def write_local_config(path: Path, targets: dict[str, list[str]], scrape_interval: str = "5s") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(local_config(targets, scrape_interval), sort_keys=False))
    return path


def prometheus_command(binary: str, config: Path, data_dir: Path, port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of a local Prometheus on ``config``, keeping its data in ``data_dir``."""
    return [binary, f"--config.file={config}", f"--storage.tsdb.path={data_dir}", f"--web.listen-address={host}:{port}"]
