"""Run ASGI apps (the router, a stub upstream) under uvicorn on free loopback ports."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from abtest.router import Router, RouterSettings, create_app
from tests.serving.server_harness import free_port


class RunningApp:
    """A uvicorn server in a thread; ``stop`` ends it (as a killed upstream would)."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@contextmanager
def running(app):
    """Yield a ``RunningApp``; stop it afterwards."""
    running_app = RunningApp(app)
    try:
        yield running_app
    finally:
        running_app.stop()


@contextmanager
def running_router(config_path: Path, **settings):
    """Start the router on ``config_path``; yield (url, router)."""
    router = Router(RouterSettings(config_path=config_path, reload_interval_s=0.1, **settings))
    with running(create_app(router)) as app:
        yield app.url, router
