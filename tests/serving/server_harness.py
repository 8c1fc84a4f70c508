"""Run the real inference server on a free loopback port inside the test process."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from serving.engines.torch_engine import TorchEngine
from serving.loopback import ThreadedServer
from serving.registry import Registry
from serving.server import ServerSettings, Service, create_app


@contextmanager
def serving_in_thread(app, *, start_timeout_s: float = 60):
    """Serve the ASGI ``app`` on a free loopback port; yield its base URL; stop it afterwards."""
    with ThreadedServer(app, start_timeout_s=start_timeout_s) as server:
        yield server.url


@contextmanager
def running_server(base_dir: Path, registry_dir: Path, *, model_name: str = "tiny", max_queue: int = 16, max_active_adapters: int = 4,
                   max_total_tokens: int | None = None, **settings):
    """Start `create_app` under uvicorn in a thread; yield (base_url, service); stop it afterwards."""
    engine = TorchEngine(base_dir, model_name, max_queue=max_queue, max_active_adapters=max_active_adapters,
                         max_total_tokens=max_total_tokens)
    service = Service(engine=engine, registry=Registry(registry_dir), base_dir=base_dir, settings=ServerSettings(**settings))
    with serving_in_thread(create_app(service)) as url:
        yield url, service
