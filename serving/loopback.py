"""Free loopback ports, and ASGI apps served on them by uvicorn in a background thread.

The demo, the benchmarks and the tests run the real server, the router and stub upstreams in
the same process as their client; this is the one place that knows how to start such a server,
tell when it is up, notice that it died, and stop it.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on now, chosen by the OS (another process may still take it first)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ThreadedServer:
    """An ASGI app served by uvicorn in a daemon thread; a context manager that starts and stops it.

    ``start`` returns once uvicorn accepts connections and raises ``RuntimeError`` if uvicorn
    exits first (a port already taken, an app that fails its start-up) or is not up within
    ``start_timeout_s`` (None: as long as it takes). ``stop`` ends it as a killed process would end for its clients.
    """

    def __init__(
        self,
        app,
        *,
        host: str = LOOPBACK,
        port: int | None = None,
        start_timeout_s: float | None = 60,
        graceful_shutdown_s: float | None = None,
        stop_timeout_s: float = 30,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(
            app, host=host, port=self.port, log_level="warning", timeout_graceful_shutdown=graceful_shutdown_s
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"uvicorn-{self.port}", daemon=True)
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s

    def start(self) -> ThreadedServer:
        """Start serving and wait until uvicorn is up; raises ``RuntimeError`` if it is not."""
        self._thread.start()
        started = time.monotonic()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server for {self.url} exited while starting; see its log above")
            if self._start_timeout_s is not None and time.monotonic() - started > self._start_timeout_s:
                self.stop()
                raise RuntimeError(f"the server for {self.url} did not start within {self._start_timeout_s:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and wait (up to ``stop_timeout_s``) for its thread to end."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=self._stop_timeout_s)

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
