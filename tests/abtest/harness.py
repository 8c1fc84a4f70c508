"""Run the router and echo upstreams on free loopback ports inside the test process."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from abtest.router import Router, RouterSettings, create_app
from serving.loopback import ThreadedServer


def running(app) -> ThreadedServer:
    """A server for ``app`` that stops within a second, as a killed upstream would; enter it to start it."""
    return ThreadedServer(app, start_timeout_s=30, graceful_shutdown_s=1, stop_timeout_s=15)


@contextmanager
def running_router(config_path: Path, **settings):
    """Start the router on ``config_path``; yield (url, router)."""
    router = Router(RouterSettings(config_path=config_path, reload_interval_s=0.1, **settings))
    with running(create_app(router)) as app:
        yield app.url, router
