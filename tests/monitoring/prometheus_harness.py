"""A real Prometheus (Debian's ``prometheus`` package) on a free loopback port, scraping given targets."""

from __future__ import annotations

import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from monitoring.prometheus import Prometheus
from monitoring.scrape_config import prometheus_command, write_local_config
from serving.loopback import free_port
from tests.binaries import PROMETHEUS_PACKAGE, require


@contextmanager
def running_prometheus(tmp_path: Path, targets: list[str] | dict[str, list[str]], scrape_interval_ms: int = 1000):
    """Start Prometheus with the shipped rules, scraping ``targets`` every ``scrape_interval_ms``; yield its client.

    ``targets`` maps scrape jobs (``monitoring.rules.JOBS``) to host:port lists; a plain list is the router's job.
    """
    binary = require("prometheus", PROMETHEUS_PACKAGE)
    port = free_port()
    jobs = targets if isinstance(targets, dict) else {"stillhouse-router": targets}
    config_path = write_local_config(tmp_path / "prometheus.yml", jobs, f"{scrape_interval_ms}ms")
    targets = [host for hosts in jobs.values() for host in hosts]
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(prometheus_command(binary, config_path, tmp_path / "tsdb", port), stdout=log, stderr=subprocess.STDOUT)
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


def wait_for_scrape_after(client: Prometheus, t: float, timeout_s: float = 30) -> None:
    """Poll until every target has a scrape stamped after ``t`` (unix seconds).

    Prometheus stamps a sample with the time its scrape started, so a scrape stamped just before
    ``t`` can hold counts made after it. Scrapes of one target never overlap: once one stamped
    after ``t`` is stored, every earlier one was answered, and traffic sent now counts after ``t``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = client.instant("min(timestamp(up))")
        stamped = result.series[0].points[-1][1] if result.ok and result.series else None
        if stamped is not None and stamped > t:
            return
        assert time.monotonic() < deadline, f"prometheus has no scrape stamped after {t:.3f} (last {stamped}) after {timeout_s:.0f} s"
        time.sleep(0.1)


def wait_until_scraped(client: Prometheus, query: str, expected: float, timeout_s: float = 30) -> None:
    """Poll until the instant ``query`` (one series) equals ``expected``: the last scrape saw everything sent."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = client.instant(query)
        value = result.series[0].points[-1][1] if result.ok else None
        if value == expected:
            return
        assert time.monotonic() < deadline, f"{query} is {value}, not {expected}, after {timeout_s:.0f} s"
        time.sleep(0.2)
