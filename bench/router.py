"""Added latency of the A/B router: the same workload direct and through the router, side by side.

Two upstreams: a trivial stub (isolates the router's own cost) and the real inference server on
the tiny model. Each runs in its own process, as does the router (one event loop: one core); the
load generator is this process. Prints p50/p99 per concurrency with the added milliseconds and
ratios, and the router's requests/s. Never asserts a time.

    .venv/bin/python bench/router.py [--requests 600] [--concurrency 1 10 100] [--skip-server]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from serving.loopback import free_port

PYTHON = sys.executable


@contextmanager
def process(args: list[str], port: int, ready_path: str = "/health", timeout_s: float = 180):
    """Start a server process and wait until it answers; stop it afterwards."""
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"{args} exited: {child.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(url + ready_path, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not start")
            time.sleep(0.2)
        yield url, child.pid
    finally:
        child.terminate()
        child.wait(timeout=30)


def stub_process(port: int):
    code = (
        "import uvicorn; from abtest.echo_upstream import create_echo_upstream; "
        f"uvicorn.run(create_echo_upstream('stub'), host='127.0.0.1', port={port}, log_level='warning', access_log=False)"
    )
    return process([PYTHON, "-c", code], port, ready_path="/docs")


def server_process(port: int, registry: Path):
    code = (
        "import sys, uvicorn; from stillhouse import build_parser; from serving.cli import serve_settings; from serving.service import build_service; "
        "from serving.server import create_app; "
        f"args = build_parser().parse_args(['serve', '--base', 'tiny', '--registry', '{registry}', '--max-queue', '512']); "
        f"uvicorn.run(create_app(build_service(serve_settings(args))), host='127.0.0.1', port={port}, log_level='warning', access_log=False)"
    )
    return process([PYTHON, "-c", code], port)


def router_process(config: Path, port: int):
    return process([PYTHON, "-m", "stillhouse", "route", "--config", str(config), "--port", str(port)], port)


async def run_load(url: str, body: dict, requests: int, concurrency: int) -> tuple[list[float], float]:
    """Latencies (s) of ``requests`` POST /generate calls, ``concurrency`` at a time; and wall time."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:

        async def worker(queue):
            for _ in queue:
                started = time.perf_counter()
                response = await client.post(f"{url}/generate", json=body)
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()

        warmup = iter(range(2 * min(concurrency, 8)))
        await asyncio.gather(*(worker(warmup) for _ in range(min(concurrency, 8))))  # open connections first
        latencies.clear()
        queue = iter(range(requests))
        started = time.perf_counter()
        await asyncio.gather(*(worker(queue) for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000 if len(values) > 1 else values[0] * 1000


def compare(name: str, direct_url: str, router: tuple[str, int], adapter: str | None, args) -> list[tuple]:
    router_url, router_pid = router
    rows = []
    for concurrency in args.concurrency:
        direct_body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": args.max_new_tokens}}
        if adapter:
            direct_body["parameters"]["adapter_id"] = adapter
        routed_body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": args.max_new_tokens, "adapter_id": "bench"}}
        requests = max(args.requests, concurrency * 3)
        direct, routed, router_cpu = [], [], 0.0
        # Two rounds in opposite order (direct first, then routed first), so drift hits both sides alike.
        for side in ("direct", "routed", "routed", "direct"):
            if side == "direct":
                direct += asyncio.run(run_load(direct_url, direct_body, requests // 2, concurrency))[0]
            else:
                cpu_before = cpu_seconds(router_pid)
                routed += asyncio.run(run_load(router_url, routed_body, requests // 2, concurrency))[0]
                router_cpu += cpu_seconds(router_pid) - cpu_before
        # Requests per CPU-second of the router process: its throughput on one core, whatever the load.
        per_core = len(routed) / router_cpu if router_cpu else float("inf")
        rows.append((name, concurrency, pct(direct, 50), pct(routed, 50), pct(direct, 99), pct(routed, 99), per_core))
    return rows


def write_config(path: Path, upstream: str, adapter: str | None) -> None:
    arm = {"role": "control", "upstream": upstream, "adapter": adapter, "weight": 1, "timeout_s": 300}
    config = {"version": 1, "salt": "bench", "sticky": {"per_request": True}, "routes": {"bench": {"mode": "passthrough", "arms": {"only": arm}}}}
    path.write_text(yaml.safe_dump(config))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600, help="requests per side and concurrency (at least 3x the concurrency)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--skip-server", action="store_true", help="only the stub upstream")
    parser.add_argument("--skip-stub", action="store_true", help="only the real server")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if not args.skip_stub:
            stub_port, router_port = free_port(), free_port()
            with stub_process(stub_port) as (stub_url, _):
                write_config(scratch / "stub.yaml", stub_url, "s@v1")
                with router_process(scratch / "stub.yaml", router_port) as router:
                    rows += compare("stub", stub_url, router, "s@v1", args)
        if not args.skip_server:
            server_port, router_port = free_port(), free_port()
            with server_process(server_port, scratch / "registry") as (server_url, _):
                write_config(scratch / "server.yaml", server_url, None)
                with router_process(scratch / "server.yaml", router_port) as router:
                    server_args = argparse.Namespace(**{**vars(args), "requests": max(args.requests // 3, 1)})
                    rows += compare("server (tiny)", server_url, router, None, server_args)

    print(f"\nrouter overhead, POST /generate, {args.max_new_tokens} new tokens; load generator, upstream and router share "
          f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}); req/s/core = routed requests per CPU-second of the router")
    header = ("upstream", "conc", "p50 direct", "p50 router", "+p50 ms", "p50 ratio", "p99 direct", "p99 router", "+p99 ms", "p99 ratio", "req/s/core")
    print(" | ".join(f"{h:>12}" for h in header))
    for name, conc, d50, r50, d99, r99, rps in rows:
        cells = (name, conc, f"{d50:.2f}", f"{r50:.2f}", f"{r50 - d50:+.2f}", f"{r50 / d50:.2f}x",
                 f"{d99:.2f}", f"{r99:.2f}", f"{r99 - d99:+.2f}", f"{r99 / d99:.2f}x", f"{rps:.0f}")
        print(" | ".join(f"{c:>12}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
