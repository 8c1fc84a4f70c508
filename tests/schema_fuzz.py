"""A schema fuzz of a running app: schemathesis cases from its ``/openapi.json``, sent over real HTTP.

Every operation of the document gets ``examples`` valid and ``examples`` invalid cases
(derandomized, so a run is the same on every machine). An answer fails the fuzz when it is a
5xx, or a non-2xx whose body is not the LoRAX error shape ``{"error": str, "error_type": str}``.
The server's and the router's fuzz tests both call ``fuzz``; the router's also tallies its own
hypothesis-made JSON bodies in a ``FuzzReport``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

SHAPE = {"error", "error_type"}


@dataclass
class FuzzReport:
    """What a fuzz run sent and which answers broke the rules (``METHOD PATH -> STATUS body``)."""

    requests: int = 0
    server_errors: list[str] = field(default_factory=list)
    shape_violations: list[str] = field(default_factory=list)

    def check(self, request: str, status: int, content: bytes) -> None:
        """Count one answer and note it when it breaks a rule."""
        self.requests += 1
        where = f"{request} -> {status} {content[:200]!r}"
        if status >= 500:
            self.server_errors.append(where)
        elif status >= 400 and not has_error_shape(content):
            self.shape_violations.append(where)

    def dropped(self, request: str, error: Exception) -> None:
        """A connection the app dropped instead of answering counts as a 5xx."""
        self.requests += 1
        self.server_errors.append(f"{request} -> {type(error).__name__}: {error}")

    def summary(self) -> str:
        """One line of figures, then every failure (the first 20 of each kind)."""
        lines = [f"{self.requests} requests, {len(self.server_errors)} answered 5xx, {len(self.shape_violations)} outside the error shape"]
        lines += self.server_errors[:20] + self.shape_violations[:20]
        return "\n".join(lines)


def has_error_shape(content: bytes) -> bool:
    """The body is exactly ``{"error": non-empty str, "error_type": non-empty str}``."""
    try:
        body = json.loads(content)
    except ValueError:
        return False
    return isinstance(body, dict) and set(body) == SHAPE and all(isinstance(body[k], str) and body[k] for k in SHAPE)


def fuzz(base_url: str, *, headers: dict[str, str] | None = None, examples: int = 20, timeout_s: float = 60) -> FuzzReport:
    """Fuzz every operation of the app at ``base_url``; ``headers`` go with every case (e.g. an admin token)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    report = FuzzReport()
    session = requests.Session()

    def send(case) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=timeout_s)
        report.check(f"{case.method} {case.formatted_path} (body {case.body!r:.200})", response.status_code, response.content)

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run = settings(
                max_examples=examples, derandomize=True, database=None, deadline=None,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
            )(given(operation.as_strategy(generation_mode=mode))(send))  # fmt: skip
            try:
                run()
            except Unsatisfiable:  # an operation without parameters or body has no invalid case
                pass
    # What no document lists: methods a path does not take, and a path that is not there.
    methods = {path: set() for path in {operation.path for operation in operations}}
    for operation in operations:
        methods[operation.path].add(operation.method.upper())
    probes = [(method, path) for path, taken in sorted(methods.items()) for method in sorted({"GET", "POST", "PUT", "DELETE"} - taken)]
    for method, path in [*probes, ("GET", "/no-such-route"), ("POST", "/no-such-route")]:
        response = session.request(method, f"{base_url}{path}", headers=headers, timeout=timeout_s)
        report.check(f"{method} {path}", response.status_code, response.content)
    session.close()
    return report
