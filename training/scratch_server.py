"""A scratch inference server, to score adapters a command trains but does not register (``ablate``, ``sweep``).

It is the server `stillhouse serve` runs, the torch engine behind ``serving.server.create_app``,
on a free loopback port with a throw-away registry. An adapter is scored there exactly as
`stillhouse eval` scores a served one (:func:`training.evaluation.evaluate` through the LoRAX
protocol): same prompts, decoding, stop sequences and metrics, and one generation implementation.
Registering each adapter also proves it is servable before it is scored.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serving import base_models
from serving.engines.torch_engine import TorchEngine
from serving.loopback import ThreadedServer
from serving.registry import Registry
from serving.server import ServerSettings, Service, create_app
from training.config import EndpointConfig
from training.endpoint import Endpoint
from training.evaluation import EvalReport, evaluate
from training.row import Row
from training.task import Task

_START_TIMEOUT_S = 120  # loading the base model comes first


class ScratchServer:
    """A running scratch server: register an adapter directory and score it on rows."""

    def __init__(self, url: str, registry: Registry, base_dir: Path, profile: str):
        self.url = url
        self._registry = registry
        self._base_dir = base_dir
        self._profile = profile
        self._added = 0

    def score(self, task: Task, rows: list[Row], adapter_dir: Path, concurrency: int = 4) -> EvalReport:
        """Register ``adapter_dir`` and evaluate it on ``rows`` with the student prompt, as `stillhouse eval` would.

        A failed request here is the server's fault, not the adapter's, so it raises instead of scoring as wrong.
        """
        self._added += 1
        entry = self._registry.add(adapter_dir, f"scratch-{self._added}", base_dir=self._base_dir, profile=self._profile)
        report = evaluate(task, rows, Endpoint(EndpointConfig(url=self.url, model=entry.id, concurrency=concurrency)), "student")
        if report.failed_requests:
            raise RuntimeError(f"the scratch server failed {report.failed_requests} of {report.rows} requests for {adapter_dir}; see its log above")
        return report


@contextmanager
def scratch_server(base_dir: Path, profile: str = "strict") -> Iterator[ScratchServer]:
    """Serve ``base_dir`` with the embedded engine on a free loopback port until the block ends."""
    engine = TorchEngine(base_dir, base_models.base_identity(base_dir).name)
    with tempfile.TemporaryDirectory(prefix="stillhouse-scratch-") as root:
        registry = Registry(Path(root))
        service = Service(engine=engine, registry=registry, base_dir=base_dir, settings=ServerSettings(profile=profile))
        with ThreadedServer(create_app(service), start_timeout_s=_START_TIMEOUT_S) as server:
            yield ScratchServer(server.url, registry, base_dir, profile)
