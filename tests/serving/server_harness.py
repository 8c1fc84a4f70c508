"""Run the real inference server on a free loopback port inside the test process."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from serving.engines.torch_engine import TorchEngine
from serving.registry import Registry
from serving.server import ServerSettings, Service, create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving_in_thread(app, *, start_timeout_s: float = 60):
    """Serve the ASGI ``app`` under uvicorn in a thread on a free loopback port; yield its base URL; stop it afterwards."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def running_server(base_dir: Path, registry_dir: Path, *, model_name: str = "tiny", max_queue: int = 16, **settings):
    """Start `create_app` under uvicorn in a thread; yield (base_url, service); stop it afterwards."""
    engine = TorchEngine(base_dir, model_name, max_queue=max_queue, max_resident_adapters=4)
    service = Service(engine=engine, registry=Registry(registry_dir), base_dir=base_dir, settings=ServerSettings(**settings))
    with serving_in_thread(create_app(service)) as url:
        yield url, service
