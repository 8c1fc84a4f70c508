"""A real Prometheus (Debian's ``prometheus`` package) on a free loopback port, scraping given targets."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from monitoring.prometheus import Prometheus
from serving.loopback import free_port


def require_prometheus() -> str:
    """The prometheus binary; under CI its absence fails the test instead of skipping it."""
    binary = shutil.which("prometheus")
    if binary is None:
        message = "prometheus is not installed: `apt-get install prometheus` (.ci/run does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


@contextmanager
def running_prometheus(tmp_path: Path, targets: list[str], scrape_interval_ms: int = 1000):
    """Start Prometheus scraping ``targets`` (host:port) every ``scrape_interval_ms``; yield its client."""
    binary = require_prometheus()
    port = free_port()
    config = {
        "global": {"scrape_interval": f"{scrape_interval_ms}ms", "evaluation_interval": f"{scrape_interval_ms}ms"},
        "scrape_configs": [{"job_name": "stillhouse", "static_configs": [{"targets": targets}]}],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    client = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while not client.ready():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        # Target discovery reaches the scraper after up to 5 s: wait until every target has been scraped.
        while len([s for s in client.instant("up == 1").series]) < len(targets):
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus never scraped {targets}: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield client
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
