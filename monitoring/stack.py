"""`stillhouse up`: the whole stack on one machine — inference server, A/B router and Prometheus.

Setup (check the ports, write Prometheus' config) → run (start each child in its own process
group, wait until each is healthy, print where everything is) → stop (Ctrl-C or SIGTERM stops
every child, then the command exits). Prometheus starts only where its binary is installed
(Debian's ``prometheus`` package); without it the A/B analysis reads the router's ``/metrics``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from monitoring.scrape_config import prometheus_command, write_local_config

LOOPBACK = "127.0.0.1"


class StackError(RuntimeError):
    """The stack cannot start: a port is taken, or a child did not become healthy."""


@dataclass(frozen=True)
class StackSettings:
    traffic: Path
    base: str = "gemma-3-270m"
    state_dir: Path = Path(".stillhouse/up")
    server_port: int = 8080
    router_port: int = 8090
    prometheus_port: int = 9090
    registry: Path | None = None
    start_timeout_s: float = 600.0  # the first start converts gemma-3-270m (about a minute)
    scrape_interval_s: int = 5  # Prometheus' scrape and rule-evaluation interval
    reload_interval_s: float = 1.0  # how often the router checks the traffic-split file


@dataclass
class Child:
    name: str
    command: list[str]
    health_url: str
    log: Path
    process: subprocess.Popen | None = field(default=None, repr=False)


def check_port_free(port: int, what: str) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            raise StackError(f"port {port} ({what}) is already in use; stop what holds it or pass another port with --{what}-port") from None


def router_config(settings: StackSettings) -> Path:
    """The traffic-split file the router runs on: the user's own, or a copy pointing at the server's port.

    Arms whose upstream is the default local server (http://127.0.0.1:8080) follow ``--server-port``;
    the copy lives in the state directory, so edits for the running stack go there.
    """
    default, actual = f"http://{LOOPBACK}:8080", f"http://{LOOPBACK}:{settings.server_port}"
    text = settings.traffic.read_text()
    if settings.server_port == 8080 or default not in text:
        return settings.traffic
    copy = settings.state_dir / settings.traffic.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(text.replace(default, actual))
    return copy


def children(settings: StackSettings) -> list[Child]:
    """The processes of the stack, in start order."""
    python = [sys.executable, "-m", "stillhouse"]
    logs = settings.state_dir / "logs"
    server = [*python, "serve", "--base", settings.base, "--host", LOOPBACK, "--port", str(settings.server_port),
              "--request-log", str(settings.state_dir / "server-requests.db")]
    if settings.registry:
        server += ["--registry", str(settings.registry)]
    router = [*python, "route", "--config", str(router_config(settings)), "--host", LOOPBACK, "--port", str(settings.router_port),
              "--request-log", str(settings.state_dir / "router-requests.db"), "--reload-interval", str(settings.reload_interval_s)]
    stack = [
        Child("server", server, f"http://{LOOPBACK}:{settings.server_port}/health", logs / "server.log"),
        Child("router", router, f"http://{LOOPBACK}:{settings.router_port}/health", logs / "router.log"),
    ]
    prometheus = shutil.which("prometheus")
    if prometheus:
        config = write_local_config(settings.state_dir / "prometheus.yml", {
            "stillhouse-server": [f"{LOOPBACK}:{settings.server_port}"], "stillhouse-router": [f"{LOOPBACK}:{settings.router_port}"],
        }, scrape_interval=f"{settings.scrape_interval_s}s")
        command = prometheus_command(prometheus, config, settings.state_dir / "tsdb", settings.prometheus_port, LOOPBACK)
        stack.append(Child("prometheus", command, f"http://{LOOPBACK}:{settings.prometheus_port}/-/ready", logs / "prometheus.log"))
    return stack


class Stack:
    """Started children; ``stop`` ends them all (their whole process groups)."""

    def __init__(self, settings: StackSettings):
        self.settings = settings
        self.children = children(settings)

    def start(self) -> None:
        ports = [(self.settings.server_port, "server"), (self.settings.router_port, "router")]
        if any(child.name == "prometheus" for child in self.children):
            ports.append((self.settings.prometheus_port, "prometheus"))
        for port, what in ports:
            check_port_free(port, what)
        for child in self.children:
            child.log.parent.mkdir(parents=True, exist_ok=True)
            with child.log.open("ab") as log:
                child.process = subprocess.Popen(child.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for child in self.children:
            self._wait_healthy(child)

    def _wait_healthy(self, child: Child) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                tail = child.log.read_text(errors="replace")[-1500:]
                raise StackError(f"the {child.name} exited with code {child.process.returncode}; its log ({child.log}) ends:\n{tail}")
            try:
                if httpx.get(child.health_url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise StackError(f"the {child.name} was not healthy at {child.health_url} within {self.settings.start_timeout_s:.0f} s; "
                         f"see {child.log}")

    def stop(self) -> None:
        running = [child for child in self.children if child.process and child.process.poll() is None]
        for child in running:
            os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in running:
            try:
                child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()

    def describe(self) -> str:
        s = self.settings
        server, router = f"http://{LOOPBACK}:{s.server_port}", f"http://{LOOPBACK}:{s.router_port}"
        lines = [
            f"server      {server}   (LoRAX: POST /generate; OpenAI: /v1/...; metrics: /metrics)",
            f"router      {router}   (the same APIs, split by {router_config(s)})",
        ]
        has_prometheus = any(child.name == "prometheus" for child in self.children)
        if has_prometheus:
            lines.append(f"prometheus  http://{LOOPBACK}:{s.prometheus_port}   (rules loaded; alerts at /alerts)")
        source = f"--prometheus http://{LOOPBACK}:{s.prometheus_port}" if has_prometheus else f"--metrics-url {router}"
        lines += [
            f"logs        {s.state_dir / 'logs'}",
            "",
            "try:",
            f"  curl -s {router}/generate -H 'content-type: application/json' -H 'X-User-Id: u1' \\",
            "    -d '{\"inputs\": \"Great food, rude staff.\", \"parameters\": {\"adapter_id\": \"sentiment\", \"max_new_tokens\": 4}}'",
            f"  stillhouse abtest analyze --route sentiment --config {router_config(s)} {source}",
            "",
            "Ctrl-C stops everything.",
        ]
        if not has_prometheus:
            lines.insert(2, "prometheus  not installed (apt-get install prometheus): the analysis reads the router's /metrics")
        return "\n".join(lines)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the stack the way Ctrl-C does


def run(settings: StackSettings) -> int:
    """Start the stack, print where it is, and keep it up until Ctrl-C or SIGTERM."""
    stack = Stack(settings)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"starting {', '.join(child.name for child in stack.children)} (base {settings.base}) ...", flush=True)
        stack.start()
        print(stack.describe(), flush=True)
        while all(child.process.poll() is None for child in stack.children):
            time.sleep(0.5)
        dead = next(child for child in stack.children if child.process.poll() is not None)
        print(f"the {dead.name} stopped (code {dead.process.returncode}); see {dead.log}; stopping the rest", file=sys.stderr)
        return 1
    except StackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
        return 0
    finally:
        stack.stop()
