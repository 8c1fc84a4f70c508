"""The A/B router: one endpoint speaking LoRAX and OpenAI that splits each route between arms.

A call whose ``adapter_id`` / ``model`` names a route is assigned an arm (sticky hash, see
``assignment``), rewritten for that arm (adapter, rendered template; see ``protocol``) and
proxied to the arm's upstream; streams are relayed as they arrive. When the upstream times out,
refuses the connection or answers 5xx before the first byte, the route's fallback arm answers
instead; when no arm answers, the client gets 502. A 4xx is the request's fault: it is relayed
as is, never retried on the fallback. Ids that name no route pass straight through to
``default_upstream``. A stream cut after its first byte ends with an error event (LoRAX's
``{"error", "error_type"}`` event, or an OpenAI error chunk), never as if it were whole.

Each arm has a circuit breaker (``circuit_breaker``), and only the upstream's own failures
count against it, so no client can open one: a timeout, a refused or broken connection, a
502/503/504, or a 500 (or other 5xx) that another arm then answered with 2xx. A 5xx that every
arm tried gives for the same request is the request's doing (a server bug on that input) and
counts against none.

Every exchange goes to the request log and to per route x arm metrics; shadow arms get a copy in
the background; ``POST /feedback`` scores an exchange. The config file is re-read when it changes
(a bad file is refused and the old one kept). Every refusal is a ``serving.errors`` class,
answered as ``{"error", "error_type"}`` by the handler the inference server uses too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from abtest import config as traffic
from abtest.assignment import assign
from abtest.circuit_breaker import CircuitBreaker
from abtest.protocol import Answer, BadCall, Call, StreamAnswer, answer_from_json, for_arm, parse_call, stream_error_event
from monitoring.catalog import ANSWERED_ROUTER_OUTCOMES, DEFAULT_ARM_LABEL, PASSTHROUGH_ROUTE_LABEL
from monitoring.metrics import RouterMetrics
from serving import auth
from serving.errors import (
    AdapterNotFoundError,
    ConflictError,
    IncompleteGenerationError,
    NotFoundError,
    PayloadTooLargeError,
    UpstreamError,
    ValidationError,
    install_error_handlers,
)
from serving.protocol import GENERATION_PATHS
from serving.request_log import Exchange, Feedback, RequestLog, hash_unit, new_request_id

log = logging.getLogger("stillhouse.router")

PIN_HEADER = "x-stillhouse-arm"  # debugging: pin a request to an arm of its route
MAX_JSON_DEPTH = 64  # nesting a generation request or feedback never needs; deeper bodies would exhaust the recursion limit
FEEDBACK_LIMIT = 1e6  # |value| bound: sums of squares of bounded values never overflow to +Inf
UNAVAILABLE_STATUSES = frozenset({502, 503, 504})  # the upstream (or a proxy before it) is down, whatever the request
# Upstream headers not relayed: hop-by-hop ones, and those the router sets itself.
_DROPPED_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server", "x-request-id"}


class UpstreamFailure(Exception):
    """An arm's upstream failed before answering; ``reason`` is a metric label.

    ``status`` is the upstream's 5xx when it answered one. ``certain``: the failure says the
    upstream is unwell whatever the request (no answer, or 502/503/504); a 500 may be the
    request's doing and counts only once another arm answers the same request.
    """

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason if status is None else f"{reason} ({status})")
        self.reason = reason
        self.status = status
        self.certain = status is None or status in UNAVAILABLE_STATUSES


@dataclass
class Served:
    """What the router remembers of an answered request, for feedback: its arm and the scores it got."""

    route: str
    arm: str
    scores: dict[str, float] = field(default_factory=dict)  # metric -> the first value sent


@dataclass
class RouterSettings:
    """How the router behaves; `stillhouse route` sets the first six from its flags."""

    config_path: Path
    admin_token: str | None = None
    api_keys: frozenset[str] = frozenset()  # empty: no client key needed
    request_log: Path | str | None = None  # a SQLite file or a postgresql:// URL
    max_body_bytes: int = 1 << 20
    reload_interval_s: float = 1.0
    max_connections: int = 512
    breaker_threshold: int = 3
    breaker_open_s: float = 10.0
    max_shadow_in_flight: int = 64
    remembered_requests: int = 100_000  # request id -> arm, for feedback without a log lookup
    passthrough_timeout_s: float = 300.0  # ids that name no route have no arm, hence no arm timeout


@dataclass
class Target:
    """Where one attempt goes, with the labels it is counted under."""

    route: str
    arm: str
    upstream: str
    adapter: str | None
    path: str
    body: dict
    timeout_s: float
    template_version: str | None = None


@dataclass
class RoutedCall:
    """What the router knows about one client call while answering it."""

    request_id: str
    call: Call
    config: traffic.TrafficConfig
    route: str
    unit_hash: str | None
    started: float = field(default_factory=time.perf_counter)
    fallback_from: str | None = None


def _key(target: Target) -> str:
    """The circuit-breaker key of a target's arm."""
    return f"{target.route}/{target.arm}"


class ConfigHolder:
    """The current traffic-split config, swapped atomically on a good reload."""

    def __init__(self, path: Path, metrics: RouterMetrics):
        self.path = path
        self.metrics = metrics
        self._seen = self._stamp()
        self.replace(traffic.load(path))

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def replace(self, config: traffic.TrafficConfig) -> None:
        self.config = config
        self.metrics.set_config(config.version_hash, {
            name: {arm_name: (arm.role, arm.weight) for arm_name, arm in route.arms.items()} for name, route in config.routes.items()
        })
        for name, route in config.routes.items():
            self.metrics.initialise_route(name, list(route.arms), route.fallback_arm(), [shadow.arm for shadow in route.shadow],
                                          list(route.metrics), list(route.checks))

    def poll(self) -> bool:
        """Reload when the file changed; True when a new config was taken."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            config = traffic.load(self.path)
        except traffic.ConfigError as error:
            self.refused(error)
            return False
        self.replace(config)
        log.info("traffic-split reloaded: version %s", config.version_hash)
        return True

    def refused(self, error: Exception) -> None:
        """Report a reload that failed: one log line naming the file (and each field), one count."""
        self.metrics.config_reload_errors.inc()
        log.error("traffic-split reload of %s refused, keeping version %s: %s", self.path, self.config.version_hash, error)


class Router:
    """The router's state and the proxying logic the handlers call."""

    def __init__(self, settings: RouterSettings, metrics: RouterMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or RouterMetrics()
        self.holder = ConfigHolder(settings.config_path, self.metrics)
        self.breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_open_s)
        self.request_log: RequestLog | None = None
        self.client: aiohttp.ClientSession | None = None
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._shadows: set[asyncio.Task] = set()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        # aiohttp rather than httpx: measured at a quarter of httpx's CPU per proxied request.
        connector = aiohttp.TCPConnector(limit=self.settings.max_connections)
        self.client = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        if self.settings.request_log:
            self.request_log = RequestLog.open(self.settings.request_log, **self.metrics.request_log.hooks("router"))

    async def stop(self) -> None:
        for task in list(self._shadows):
            task.cancel()
        await asyncio.gather(*self._shadows, return_exceptions=True)
        await self.client.close()
        if self.request_log is not None:
            self.request_log.close()  # flushes every accepted row

    async def watch_config(self) -> None:
        """Poll the config file's mtime and size; runs until cancelled, whatever one reload raises."""
        while True:
            await asyncio.sleep(self.settings.reload_interval_s)
            try:
                self.holder.poll()
            except Exception as error:  # a bug in one reload must not end every later one
                log.exception("traffic-split reload failed")
                self.holder.refused(error)

    # --- checks ---------------------------------------------------------------------------

    async def read_body(self, request: Request) -> object:
        """The JSON body, refusing bodies over the size limit before reading them whole."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLargeError(f"the body is over {limit} bytes; send a shorter prompt")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise PayloadTooLargeError(f"the body is over {limit} bytes; send a shorter prompt")
        too_deep = ValidationError(f"the body nests deeper than {MAX_JSON_DEPTH} levels; flatten it")
        try:
            body = json.loads(data)
        except ValueError as error:
            raise ValidationError(f"the body is not valid JSON: {error}") from error
        except RecursionError:
            raise too_deep from None
        if not _nesting_within(body, MAX_JSON_DEPTH):
            raise too_deep
        return body

    # --- routing --------------------------------------------------------------------------

    def plan(self, call: Call, request: Request, request_id: str) -> tuple[RoutedCall, list[Target]]:
        """The exchange and the targets to try in order (assigned arm, then the fallback)."""
        config = self.holder.config  # one config for the whole request, even across a reload
        route = config.routes.get(call.route_key) if call.route_key else None
        if route is None:
            upstream = config.default_upstream
            if not upstream:
                raise AdapterNotFoundError(f"{call.route_key!r} names no route and the config sets no default_upstream; "
                                           f"use one of {sorted(config.routes)}")
            exchange = RoutedCall(request_id, call, config, PASSTHROUGH_ROUTE_LABEL, None)
            target = Target(PASSTHROUGH_ROUTE_LABEL, DEFAULT_ARM_LABEL, upstream, call.route_key, call.path, call.body,
                            self.settings.passthrough_timeout_s)
            return exchange, [target]
        unit = self._unit(config.sticky, request, call.body)
        unit_hash = hash_unit(unit, config.salt) if unit is not None else None
        pinned = request.headers.get(PIN_HEADER)
        if pinned in route.arms:
            arm = pinned
        else:
            arm = assign(config.salt, call.route_key, unit if unit is not None else request_id, route.weights())
        names = [arm] + [n for n in [route.fallback_arm()] if n and n != arm]
        exchange = RoutedCall(request_id, call, config, call.route_key, unit_hash)
        return exchange, [self._target(call, call.route_key, route, name) for name in names]

    @staticmethod
    def _unit(sticky: traffic.Sticky, request: Request, body: dict) -> str | None:
        if sticky.header:
            return request.headers.get(sticky.header)
        if sticky.body_field:
            value = body.get(sticky.body_field)
            return str(value) if value is not None else None
        return None  # per request: the request id decides

    @staticmethod
    def _target(call: Call, route_name: str, route: traffic.Route, arm_name: str, stream: bool | None = None) -> Target:
        arm = route.arms[arm_name]
        path, body = for_arm(call, arm.adapter, lambda prompt: route.render(arm, prompt), stream=stream)
        template = arm.template if route.mode == "template" else None
        return Target(route_name, arm_name, arm.upstream, arm.adapter, path, body, arm.timeout_s, traffic.template_version(template))

    async def answer(self, call: Call, request: Request) -> Response:
        """Proxy a call, falling back arm by arm; raise ``UpstreamError`` when none answers."""
        request_id = new_request_id()
        exchange, targets = self.plan(call, request, request_id)
        failed = None
        suspects: list[str] = []  # arms that answered this request 500: the arm's fault only if another arm answers it
        why: list[str] = []
        for index, target in enumerate(targets):
            key = _key(target)
            if not self.breaker.allow(key, last_resort=index == len(targets) - 1):
                self.metrics.upstream_errors.labels(target.route, target.arm, "circuit_open").inc()
                why.append(f"{target.arm}: circuit open")
                failed = failed or target
                continue
            try:
                if failed is not None:
                    exchange.fallback_from = failed.arm
                    self.metrics.fallbacks.labels(target.route, failed.arm, target.arm).inc()
                response = await (self._stream(exchange, target) if call.stream else self._plain(exchange, target))
            except UpstreamFailure as failure:
                if failure.certain:
                    self.breaker.failure(key)
                else:
                    self.breaker.release(key)
                    suspects.append(key)
                self.metrics.upstream_errors.labels(target.route, target.arm, failure.reason).inc()
                log.warning("upstream of %s/%s failed (%s)", target.route, target.arm, failure)
                why.append(f"{target.arm}: {failure}")
                failed = failed or target
                continue
            except BaseException:  # the client went away, or a bug: no verdict on the upstream
                self.breaker.release(key)
                raise
            if response.status_code < 400:
                for suspect in suspects:
                    self.breaker.failure(suspect)
            self.breaker.success(key)  # it answered, even if it refused the request: it is up
            return response
        last = targets[-1]
        error = UpstreamError(f"no upstream of route {exchange.route!r} answered ({'; '.join(why)}); try again later")
        self.metrics.observe_request(last.route, last.arm, error.outcome)
        self._log(exchange, last, Answer(), error.status_code, error.outcome, None, None)
        raise error

    def _headers(self, exchange: RoutedCall, target: Target, upstream: aiohttp.ClientResponse) -> dict[str, str]:
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED_HEADERS}
        headers.update({
            "x-request-id": exchange.request_id,
            "x-stillhouse-route": exchange.route,
            "x-stillhouse-arm": target.arm,
            "x-stillhouse-config-version": exchange.config.version_hash,
        })
        return headers

    async def _send(self, target: Target, request_id: str, stream: bool) -> aiohttp.ClientResponse:
        """POST to the target; the body is left unread. Raises ``UpstreamFailure`` on timeout, connection error, 5xx."""
        url = target.upstream.rstrip("/") + target.path
        # Streams get a per-read timeout (a long answer is fine while tokens keep coming); plain calls a total one.
        timeout = (
            aiohttp.ClientTimeout(total=None, sock_connect=target.timeout_s, sock_read=target.timeout_s)
            if stream
            else aiohttp.ClientTimeout(total=target.timeout_s)
        )
        headers = {"content-type": "application/json", "accept-encoding": "identity", "x-request-id": request_id}
        try:
            response = await self.client.post(url, data=json.dumps(target.body).encode(), headers=headers, timeout=timeout)
        except asyncio.TimeoutError as error:
            raise UpstreamFailure("timeout") from error
        except aiohttp.ClientError as error:
            raise UpstreamFailure("connect") from error
        if response.status >= 500:
            response.close()
            raise UpstreamFailure("5xx", response.status)
        return response

    @staticmethod
    async def _read(response: aiohttp.ClientResponse) -> bytes:
        try:
            return await response.read()
        except asyncio.TimeoutError as error:
            raise UpstreamFailure("timeout") from error
        except aiohttp.ClientError as error:
            raise UpstreamFailure("read") from error
        finally:
            response.release()

    async def _plain(self, exchange: RoutedCall, target: Target) -> Response:
        upstream = await self._send(target, exchange.request_id, stream=False)
        content = await self._read(upstream)
        elapsed = time.perf_counter() - exchange.started
        ok = upstream.status < 400
        answer = answer_from_json(exchange.call.protocol, _json(content)) if ok else Answer()
        outcome = self._outcome(exchange, ok)
        self._finish(exchange, target, answer, upstream.status, outcome, elapsed, elapsed)
        return Response(content, status_code=upstream.status, headers=self._headers(exchange, target, upstream))

    async def _stream(self, exchange: RoutedCall, target: Target) -> Response:
        upstream = await self._send(target, exchange.request_id, stream=True)
        if upstream.status >= 400:
            content = await self._read(upstream)
            self._finish(exchange, target, Answer(), upstream.status, "client_error", None, None)
            return Response(content, status_code=upstream.status, headers=self._headers(exchange, target, upstream))
        chunks = upstream.content.iter_any()
        try:
            # The first chunk decides: a failure before it can still fall back, one after it cannot.
            first = await asyncio.wait_for(chunks.__anext__(), target.timeout_s)
        except (StopAsyncIteration, asyncio.TimeoutError, aiohttp.ClientError) as error:
            upstream.close()
            raise UpstreamFailure("timeout" if isinstance(error, asyncio.TimeoutError) else "stream") from error
        ttft = time.perf_counter() - exchange.started
        parser = StreamAnswer(exchange.call.protocol)

        async def relay():
            outcome, status = "cancelled", 200
            try:
                parser.feed(first)
                yield first
                try:
                    async for chunk in chunks:
                        parser.feed(chunk)
                        yield chunk
                    cut = None if parser.ended else "the upstream ended the stream before its last event"
                except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                    cut = f"the upstream's stream broke ({type(error).__name__})"
                if cut is None:
                    outcome = self._outcome(exchange, True)
                else:
                    # Too late to fall back or change the status: the error event tells the client the answer is incomplete.
                    outcome, status = "upstream_error", 502
                    self.breaker.failure(_key(target))
                    self.metrics.upstream_errors.labels(target.route, target.arm, "cut").inc()
                    log.warning("stream of %s/%s cut after its first byte: %s", target.route, target.arm, cut)
                    error = IncompleteGenerationError(f"{cut}; the answer is incomplete, send it again")
                    event = stream_error_event(exchange.call.protocol, error)
                    yield (b"\n\n" if parser.partial else b"") + event
            finally:
                # A stream cut short leaves unread bytes, so its connection must not be reused.
                if outcome in ("success", "fallback"):
                    upstream.release()
                else:
                    upstream.close()
                self._finish(exchange, target, parser.result(), status, outcome, time.perf_counter() - exchange.started, ttft)

        return StreamingResponse(relay(), status_code=upstream.status, headers=self._headers(exchange, target, upstream))

    @staticmethod
    def _outcome(exchange: RoutedCall, ok: bool) -> str:
        if not ok:
            return "client_error"
        return "fallback" if exchange.fallback_from else "success"

    def _finish(self, exchange: RoutedCall, target: Target, answer: Answer, status: int, outcome: str,
                duration_s: float | None, ttft_s: float | None) -> None:
        """Metrics, log row, feedback index and shadow calls for an answered exchange."""
        self.metrics.observe_request(
            target.route, target.arm, outcome, duration_s=duration_s, ttft_s=ttft_s,
            prompt_tokens=answer.prompt_tokens, generated_tokens=answer.generated_tokens,
        )
        self._log(exchange, target, answer, status, outcome, duration_s, ttft_s)
        self._remember(exchange.request_id, Served(exchange.route, target.arm))
        if outcome in ANSWERED_ROUTER_OUTCOMES:
            route = exchange.config.routes.get(exchange.route)
            for name, check in (route.checks.items() if route else ()):
                self.metrics.observe_check(exchange.route, target.arm, name, check.passes(answer.text))
            self._start_shadows(exchange, target.arm, answer.text)

    def _log(self, exchange: RoutedCall, target: Target, answer: Answer, status: int, outcome: str,
             duration_s: float | None, ttft_s: float | None, shadow_of: str | None = None, agreement: bool | None = None) -> None:
        if self.request_log is None:
            return
        self.request_log.record(Exchange(
            request_id=new_request_id() if shadow_of else exchange.request_id,
            prompt=exchange.call.prompt,
            protocol=exchange.call.protocol,
            source="router",
            route=exchange.route,
            arm=target.arm,
            adapter=target.adapter,
            template_version=target.template_version,
            config_version=exchange.config.version_hash,
            output=answer.text,
            parameters=exchange.call.parameters,
            prompt_tokens=answer.prompt_tokens,
            generated_tokens=answer.generated_tokens,
            latency_ms=duration_s * 1000 if duration_s is not None else None,
            ttft_ms=ttft_s * 1000 if ttft_s is not None else None,
            status=status,
            outcome=outcome,
            unit_hash=exchange.unit_hash,
            fallback_from=exchange.fallback_from if not shadow_of else None,
            shadow_of=shadow_of,
            shadow_agreement=agreement,
        ))

    # --- shadow traffic -------------------------------------------------------------------

    def _start_shadows(self, exchange: RoutedCall, served_arm: str, served_text: str | None) -> None:
        route = exchange.config.routes.get(exchange.route)
        if route is None:
            return
        for spec in route.shadow:
            if spec.arm == served_arm or random.random() >= spec.fraction:
                continue
            if len(self._shadows) >= self.settings.max_shadow_in_flight:
                self.metrics.shadow.labels(exchange.route, spec.arm, "skipped").inc()
                continue
            target = self._target(exchange.call, exchange.route, route, spec.arm, stream=False)
            task = asyncio.create_task(self._shadow(exchange, target, served_text))
            self._shadows.add(task)
            task.add_done_callback(self._shadows.discard)

    async def _shadow(self, exchange: RoutedCall, target: Target, served_text: str | None) -> None:
        started = time.perf_counter()
        try:
            response = await self._send(target, new_request_id(), stream=False)
            content = await self._read(response)
            answer = answer_from_json(exchange.call.protocol, _json(content)) if response.status < 400 else None
        except UpstreamFailure:
            answer = None
        if answer is None or answer.text is None:
            self.metrics.shadow.labels(target.route, target.arm, "error").inc()
            self._log(exchange, target, Answer(), 502, "upstream_error", time.perf_counter() - started, None, shadow_of=exchange.request_id)
            return
        agree = answer.text == served_text
        self.metrics.shadow.labels(target.route, target.arm, "agree" if agree else "disagree").inc()
        elapsed = time.perf_counter() - started
        self._log(exchange, target, answer, 200, "success", elapsed, None, shadow_of=exchange.request_id, agreement=agree)

    # --- feedback -------------------------------------------------------------------------

    async def feedback(self, body: object) -> dict:
        """Validate ``{request_id, metric, value}`` against the route's metrics and record it.

        ``value`` is a finite number with ``|value| <= 1e6`` (0/1 or true/false for a boolean
        metric). The first score of a request for a metric wins: a second one is refused with 409
        and counted nowhere, as Prometheus counters cannot take a value back (a retried call
        that got no answer sees the 409 and knows the first one landed).
        """
        if not isinstance(body, dict) or set(body) != {"request_id", "metric", "value"}:
            raise ValidationError("send exactly {\"request_id\": ..., \"metric\": ..., \"value\": ...}")
        request_id, metric, value = body["request_id"], body["metric"], body["value"]
        for name, given in (("request_id", request_id), ("metric", metric)):
            if not isinstance(given, str):
                raise ValidationError(f"`{name}` must be a string, got {type(given).__name__}")
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not abs(value) <= FEEDBACK_LIMIT:  # also refuses NaN, inf and huge integers
            raise ValidationError(f"`value` must be a finite number between -{FEEDBACK_LIMIT:g} and {FEEDBACK_LIMIT:g}, got {value!r}")
        served = self._served.get(request_id)
        if served is None and self.request_log is not None:
            served = await asyncio.to_thread(self._logged, request_id)  # off the event loop: it may wait for the writer
            if served is not None:
                served = self._remember(request_id, self._served.get(request_id) or served)  # one record even if another call raced
        if served is None:
            raise NotFoundError(f"no routed request has id {request_id!r}; send the x-request-id of a response")
        route = self.holder.config.routes.get(served.route)
        spec = route.metrics.get(metric) if route else None
        if spec is None:
            declared = sorted(route.metrics) if route else []
            raise ValidationError(f"route {served.route!r} declares no metric {metric!r}; declared: {declared}")
        if spec.type == "boolean" and value not in (0, 1):
            raise ValidationError(f"{metric} is boolean: send true/false or 0/1")
        if metric in served.scores:
            raise ConflictError(f"request {request_id} already has a {metric} score ({served.scores[metric]:g}); "
                                f"the first score counts, send one per request and metric")
        value = float(value)
        served.scores[metric] = value
        self.metrics.observe_feedback(served.route, served.arm, metric, value)
        if self.request_log is not None:
            self.request_log.feedback(Feedback(request_id, metric, value))
        return {"request_id": request_id, "route": served.route, "arm": served.arm, "metric": metric, "value": value}

    def _remember(self, request_id: str, served: Served) -> Served:
        """Index an answered request for feedback, forgetting the oldest beyond ``remembered_requests``."""
        self._served[request_id] = served
        if len(self._served) > self.settings.remembered_requests:
            self._served.popitem(last=False)
        return served

    def _logged(self, request_id: str) -> Served | None:
        """The arm and scores of a request the router no longer remembers, from the request log."""
        self.request_log.flush()
        row = self.request_log.store.arm_of(request_id)
        if row is None or row.source != "router" or not row.route or not row.arm:
            return None
        mine = [r for r in self.request_log.store.query(route=row.route, arm=row.arm, source="router", since=row.ts,
                                                         until=math.nextafter(row.ts, math.inf)) if r.exchange.request_id == request_id]
        return Served(row.route, row.arm, dict(mine[0].feedback) if mine else {})


def _nesting_within(value: object, limit: int) -> bool:
    """Whether a parsed JSON value nests at most ``limit`` arrays and objects deep (iteratively: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return False
                stack.append((child, depth + 1))
    return True


def _json(content: bytes) -> object:
    try:
        return json.loads(content)
    except ValueError:
        return None


def create_app(router: Router) -> FastAPI:
    """The router's FastAPI app; the upstream client, log writer and config watcher live with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        watcher = asyncio.create_task(router.watch_config())
        try:
            yield
        finally:
            watcher.cancel()
            await router.stop()

    app = FastAPI(title="Stillhouse A/B router", lifespan=lifespan)

    install_error_handlers(app)

    def check_client(request: Request) -> None:
        auth.check_api_key(request, router.settings.api_keys)

    def check_admin(request: Request) -> None:
        auth.check_admin(request, router.settings.admin_token, command="router")

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def generation(request: Request):
        check_client(request)
        body = await router.read_body(request)
        try:
            call = parse_call(request.url.path, body)
        except BadCall as error:
            raise ValidationError(str(error)) from error
        return await router.answer(call, request)

    for path in sorted(GENERATION_PATHS):
        app.add_api_route(path, generation, methods=["POST"])

    @app.post("/feedback")
    async def feedback(request: Request):
        check_client(request)
        return await router.feedback(await router.read_body(request))

    @app.get("/admin/config")
    async def admin_config(request: Request):
        check_admin(request)
        config = router.holder.config
        return {"version": config.version_hash, "path": str(router.settings.config_path), "config": config.model_dump(mode="json")}

    @app.post("/admin/weights")
    async def admin_weights(request: Request):
        check_admin(request)
        body = await router.read_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("route"), str) or not isinstance(body.get("weights"), dict):
            raise ValidationError("send {\"route\": NAME, \"weights\": {ARM: WEIGHT}}")
        try:
            config = traffic.with_weights(router.holder.config, body["route"], body["weights"])
        except traffic.ConfigError as error:
            raise ValidationError("; ".join(str(p) for p in error.problems)) from error
        router.holder.replace(config)
        log.info("weights of route %s set to %s: version %s", body["route"], body["weights"], config.version_hash)
        return {"version": config.version_hash, "route": body["route"], "weights": config.routes[body["route"]].weights()}

    return app
