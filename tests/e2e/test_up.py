"""`stillhouse up`: the local stack starts, answers, is scraped, and stops every child on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from monitoring.prometheus import Prometheus
from serving.loopback import free_port
from tests.binaries import PROMETHEUS_PACKAGE, require


def up(tmp_path, *ports: int) -> list[str]:
    server, router, prometheus = ports
    return [sys.executable, "-m", "stillhouse", "up", "--base", "tiny", "--server-port", str(server), "--router-port", str(router),
            "--prometheus-port", str(prometheus), "--state-dir", str(tmp_path / "up")]


def test_a_taken_port_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(up(tmp_path, free_port(), port, free_port()), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"port {port} (router) is already in use" in result.stderr and "--router-port" in result.stderr


def test_the_stack_starts_answers_and_stops(tmp_path):
    require("prometheus", PROMETHEUS_PACKAGE)
    ports = free_port(), free_port(), free_port()
    process = subprocess.Popen(up(tmp_path, *ports), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while "Ctrl-C stops everything." not in lines:
            line = process.stdout.readline()
            assert line, f"`stillhouse up` ended early:\n{''.join(lines)}"
            lines.append(line.rstrip("\n"))
        output = "\n".join(lines)
        assert f"http://127.0.0.1:{ports[0]}" in output and f"http://127.0.0.1:{ports[2]}" in output
        body = {"inputs": "Great food.", "parameters": {"adapter_id": "sentiment", "max_new_tokens": 2}}
        answered = httpx.post(f"http://127.0.0.1:{ports[1]}/generate", json=body, headers={"X-User-Id": "u1", "x-stillhouse-arm": "teacher"},
                              timeout=60)
        assert answered.status_code == 200 and answered.headers["x-stillhouse-arm"] == "teacher"  # the copy points at the server
        prometheus = Prometheus(f"http://127.0.0.1:{ports[2]}")
        deadline = time.monotonic() + 30
        while len(prometheus.instant("up == 1").series) < 2:
            assert time.monotonic() < deadline, "Prometheus never scraped the server and the router"
            time.sleep(0.5)
        assert prometheus.instant("route_arm_outcome:stillhouse_router_requests:rate1m").status in ("ok", "empty")  # rules loaded
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    for port in ports:  # every child is gone: nothing listens on its port any more
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
