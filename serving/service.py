"""What the server's handlers call: adapters, limits, generation, and each exchange's metrics and log row.

``Service`` is protocol-free: a route turns its wire request into a ``Call``, ``prepare``
resolves the adapter and every limit and default and compiles any output constraint,
``stream``/``complete`` run the engine. Each
call is counted and logged exactly once, here: a refusal in ``prepare``, everything else when
the engine stream ends. ``build_service`` assembles a service from ``ServeSettings``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Literal

from jinja2 import TemplateError
from pydantic import BaseModel

from monitoring.catalog import BASE_ADAPTER_LABEL, UNKNOWN_ADAPTER_LABEL
from monitoring.metrics import ServerMetrics
from serving import servability
from serving.engines import ENGINES, EngineName
from serving.engines.base import AdapterRef, Engine, Event, GenerationRequest, GenerationResult, SamplingParams, TokenEvent
from serving.engines.constraint import Constraint, ConstraintSpec, Grammars
from serving.engines.model_text import text_config
from serving.engines.precision import DTYPES, DtypeName, resolve_dtype
from serving.errors import AdapterNotServableError, ConflictError, GenerationError, IncompleteGenerationError, ServingError, ValidationError
from serving.registry import Registry
from serving.request_log import Exchange, RequestLog

log = logging.getLogger(__name__)
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB, as the router's: far above any prompt a model's context holds


@dataclass(frozen=True)
class ServerSettings:
    """How the server behaves; every field has a CLI flag in `stillhouse serve`."""

    profile: str = "strict"
    admin_token: str | None = None
    default_max_new_tokens: int = 256  # LoRAX uses all remaining context; on CPU that is minutes
    max_stop_sequences: int = 4
    max_input_length: int | None = None  # default: max_total_tokens - 1
    request_log: Path | str | None = None  # a SQLite file or a postgresql:// URL recording every exchange
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies are refused (413)
    pinned_adapters: tuple[str, ...] = ()  # registry adapters loaded at start-up and never evicted


@dataclass(frozen=True)
class ServeSettings:
    """Everything `stillhouse serve` builds a service from: base, registry, engine and server settings."""

    base: str = "gemma-3-270m"  # a known base name or a local HF model directory
    registry: Path | None = None  # default: $STILLHOUSE_HOME/registry
    engine: EngineName = "torch"
    engine_url: str | None = None  # vllm: attach to this running server instead of launching one
    max_queue: int = 64  # requests waiting or running before 429 overloaded
    max_active_adapters: int = 8  # adapters applied in batches at once (slots), LRU
    max_cpu_adapters: int = 64  # torch: adapters kept in CPU memory for a fast reload, LRU
    max_total_tokens: int | None = None  # default: the model's, at most 8192
    dtype: DtypeName = "auto"  # auto (bfloat16 where the hardware computes it natively), float32 or bfloat16
    threads: int | None = None  # torch: compute threads (default: the cores this process may use)
    server: ServerSettings = field(default_factory=ServerSettings)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.engine_url and self.engine != "vllm":
            raise ValueError("engine_url attaches to a vLLM server: set engine='vllm' or leave engine_url out")


@dataclass(frozen=True)
class Call:
    """One generation request as the service sees it, whichever protocol it arrived in."""

    request_id: str
    arrived: float  # time.perf_counter() at arrival
    protocol: str  # lorax | openai_completions | openai_chat (the request log's vocabulary)
    prompt: str
    parameters: BaseModel  # the wire parameters, logged with the exchange
    adapter_id: str | None
    params: SamplingParams  # max_new_tokens is resolved by ``Service.prepare``
    max_new_tokens: int | None  # as requested; None takes the server's default
    truncate: int | None = None  # keep only the last ``truncate`` prompt tokens
    constraint: ConstraintSpec | None = None  # structured output, compiled by ``Service.prepare``
    answer_text: Callable[[GenerationResult], str] = lambda result: result.generated_text  # the text the client gets


@dataclass
class Prepared:
    """A call ready for the engine, and what the engine answered so far."""

    call: Call
    request: GenerationRequest
    adapter_label: str
    adapter_id: str  # as the client should see it: canonical id, or "" for the base
    started: float
    result: GenerationResult | None = None
    error: ServingError | None = None

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class Service:
    """Adapter resolution, limits, generation, metrics and the request log, behind every route."""

    engine: Engine
    registry: Registry
    base_dir: Path
    settings: ServerSettings
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    request_log: RequestLog | None = None
    _servable: set[str] = field(default_factory=set)
    _loading: dict[str, asyncio.Lock] = field(default_factory=dict)  # one per adapter: different adapters load at once
    _resident: set[str] = field(default_factory=set)  # as last observed, to count evictions
    _pinned: set[str] = field(default_factory=set)  # canonical ids of the pinned adapters
    _grammars: Grammars | None = None  # built on the first constrained request (a few seconds)
    _grammars_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # --- adapters --------------------------------------------------------------------

    def is_base(self, adapter_id: str | None) -> bool:
        return not adapter_id or adapter_id == self.engine.model_name

    def resolve(self, adapter_id: str | None) -> AdapterRef | None:
        """The registry adapter an id names (``None`` for the base), checked for servability once."""
        if self.is_base(adapter_id):
            return None
        entry = self.registry.resolve(adapter_id)
        if entry.id not in self._servable:
            violations = servability.check_adapter(entry.path, self.base_dir, profile=self.settings.profile)
            if violations:
                reasons = servability.summary(violations)
                raise AdapterNotServableError(f"adapter {entry.id} is not servable here ({self.settings.profile} profile): {reasons}")
            self._servable.add(entry.id)
        return AdapterRef(adapter_id=entry.id, path=entry.path)

    async def ensure_resident(self, adapter: AdapterRef | None) -> None:
        """Load an adapter before its first request, so the load time is measured on its own.

        Requests for one adapter wait for one load; loads of different adapters overlap, so the
        torch engine copies all of a burst's newcomers into their slots at one token boundary.
        """
        if adapter is None or adapter.adapter_id in self.engine.resident_adapters():
            return
        async with self._loading.setdefault(adapter.adapter_id, asyncio.Lock()):
            try:
                seconds = await self.engine.load_adapter(adapter)
            except GenerationError as error:
                raise _public(error, f"loading adapter {adapter.adapter_id}") from error
        if seconds:
            self.metrics.adapter_load.labels(adapter.adapter_id).observe(seconds)
        self.observe_residency()

    def pin_problems(self) -> list[str]:
        """Why a ``pinned_adapters`` id cannot be pinned (not in the registry, not servable, the base), each naming the flag."""
        problems = []
        for adapter_id in self.settings.pinned_adapters:
            try:
                if self.resolve(adapter_id) is None:
                    problems.append(f"--pin-adapter {adapter_id}: that is the base model, which is always served; name a registry adapter")
            except ServingError as error:
                problems.append(f"--pin-adapter {adapter_id}: {error}")
        return problems

    async def pin_adapters(self) -> None:
        """Load the ``pinned_adapters`` into active slots for the server's lifetime (at start-up)."""
        problems = self.pin_problems()
        if problems:
            raise ValueError("; ".join(problems))
        for adapter_id in self.settings.pinned_adapters:
            adapter = self.resolve(adapter_id)
            try:
                seconds = await self.engine.pin_adapter(adapter)
            except GenerationError as error:
                raise ValueError(f"--pin-adapter {adapter_id}: {error}") from error
            self._pinned.add(adapter.adapter_id)
            self.metrics.adapter_load.labels(adapter.adapter_id).observe(seconds)
            log.info("pinned adapter %s", adapter.adapter_id)
        self.observe_residency()

    async def unload(self, adapter_id: str) -> bool:
        canonical = self.registry.resolve(adapter_id).id
        if canonical in self._pinned:
            raise ConflictError(f"adapter {canonical} is pinned (--pin-adapter); restart the server without that flag to unload it")
        self.observe_residency()
        unloaded = await self.engine.unload_adapter(canonical)
        self.observe_residency(unloaded={canonical})
        return unloaded

    def observe_residency(self, unloaded: frozenset[str] | set[str] = frozenset()) -> None:
        """Export the resident adapters; one that left without being ``unloaded`` on request was evicted (LRU)."""
        resident = set(self.engine.resident_adapters())
        for adapter_id in resident - self._resident:
            self.metrics.adapter_evictions.labels(adapter_id)  # exported at 0 from its first load on
        for adapter_id in self._resident - resident - set(unloaded):
            self.metrics.adapter_evictions.labels(adapter_id).inc()
        self._resident = resident
        self.metrics.resident_adapters.set(len(resident))

    # --- limits ----------------------------------------------------------------------

    def max_input_length(self) -> int:
        return self.settings.max_input_length or self.engine.max_total_tokens - 1

    def check_stop_count(self, stop: tuple[str, ...]) -> None:
        """Refuse more stop sequences than the server allows (``max_stop_sequences``)."""
        limit = self.settings.max_stop_sequences
        if len(stop) > limit:
            raise ValidationError(f"`stop` supports up to {limit} stop sequences. Given: {len(stop)}")

    def fit(self, ids: list[int], requested_max_new_tokens: int | None, truncate: int | None) -> tuple[list[int], int]:
        """The prompt ids after ``truncate`` and the new-token budget, within the model's limits."""
        if truncate is not None and len(ids) > truncate:
            ids = ids[-truncate:]
        if len(ids) > self.max_input_length():
            raise ValidationError(
                f"`inputs` must have less than {self.max_input_length()} tokens. Given: {len(ids)}; "
                "shorten the prompt or set `truncate`"
            )
        total = self.engine.max_total_tokens
        max_new = requested_max_new_tokens or min(self.settings.default_max_new_tokens, total - len(ids))
        if len(ids) + max_new > total:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {total}. "
                f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`; lower max_new_tokens"
            )
        return ids, max_new

    # --- structured output -----------------------------------------------------------

    async def compile(self, spec: ConstraintSpec | None, params: SamplingParams) -> Constraint | None:
        """The compiled constraint (off the event loop, cached); ``ValidationError`` naming the field if it cannot compile."""
        if spec is None:
            return None
        if params.ignore_eos_token:
            raise ValidationError("`ignore_eos_token` cannot be combined with structured output: the grammar ends at EOS")
        async with self._grammars_lock:
            if self._grammars is None:
                vocab_size = text_config(self.base_dir).vocab_size  # the logits row, which may exceed the tokenizer's
                self._grammars = await asyncio.to_thread(Grammars, self.engine.text, vocab_size)
        return await asyncio.to_thread(self._grammars.compile, spec)

    # --- requests --------------------------------------------------------------------

    async def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt the model's chat template writes for ``messages``; a chat it refuses is a 422."""
        try:
            return await asyncio.to_thread(self.engine.apply_chat_template, messages)
        except (ValueError, TemplateError) as error:
            raise ValidationError(f"messages: {error}") from error

    async def prepare(self, call: Call) -> Prepared:
        """Resolve the adapter and every limit, and make the adapter resident; a refusal is counted and logged."""
        started = time.perf_counter()
        label = UNKNOWN_ADAPTER_LABEL
        try:
            self.check_stop_count(call.params.stop)
            adapter = self.resolve(call.adapter_id)
            label = adapter.adapter_id if adapter else BASE_ADAPTER_LABEL
            # Off the event loop: a long prompt takes seconds to tokenize, and /health must still answer.
            ids = await asyncio.to_thread(self.engine.tokenize, call.prompt)
            ids, max_new = self.fit(ids, call.max_new_tokens, call.truncate)
            constraint = await self.compile(call.constraint, call.params)
            await self.ensure_resident(adapter)
        except ServingError as error:
            self.metrics.observe_request(label, error.outcome)
            self._log(call, None, error)
            raise
        params = dataclasses.replace(call.params, max_new_tokens=max_new)
        return Prepared(
            call=call,
            request=GenerationRequest(prompt_ids=ids, params=params, adapter=adapter, constraint=constraint),
            adapter_label=label,
            adapter_id=adapter.adapter_id if adapter else "",
            started=started,
        )

    async def stream(self, prepared: Prepared) -> AsyncIterator[Event]:
        """Engine events for a prepared call; its metrics and log row are recorded when the stream ends.

        Raises ``OverloadedError`` before the first event when the queue is full.
        """
        first_token_at = None
        outcome = "cancelled"
        self.metrics.queue_depth.set(self.engine.queue_depth() + 1)
        events = self.engine.generate(prepared.request)
        try:
            async for event in events:
                if isinstance(event, TokenEvent):
                    first_token_at = first_token_at or time.perf_counter()
                else:
                    outcome = "success"
                    prepared.result = event
                    now = time.perf_counter()
                    self.metrics.observe_request(
                        prepared.adapter_label,
                        "success",
                        duration_s=now - prepared.started,
                        ttft_s=(first_token_at or now) - prepared.started,
                        prompt_tokens=event.prompt_tokens,
                        generated_tokens=event.generated_tokens,
                    )
                yield event
        except ServingError as error:
            outcome = error.outcome
            prepared.error = _public(error, f"request {prepared.call.request_id}") if isinstance(error, GenerationError) else error
            raise prepared.error from error
        finally:
            await events.aclose()
            if outcome != "success":
                self.metrics.observe_request(prepared.adapter_label, outcome)
            self.metrics.queue_depth.set(self.engine.queue_depth())
            self._log(prepared.call, prepared, prepared.error)

    async def open_stream(self, prepared: Prepared) -> AsyncIterator[Event]:
        """``stream`` with its first event already pulled, so a full queue is an HTTP error, not a stream event."""
        events = self.stream(prepared)
        first = await events.__anext__()
        return _prepend(first, events)

    async def complete(self, prepared: Prepared) -> GenerationResult:
        """Run a prepared call to its end."""
        async for _ in self.stream(prepared):
            pass
        if prepared.result is None:
            raise IncompleteGenerationError("generation ended without a result")
        return prepared.result

    def _log(self, call: Call, prepared: Prepared | None, error: ServingError | None) -> None:
        """Queue one exchange for the request log (a no-op without ``--request-log``)."""
        if self.request_log is None:
            return
        result = prepared.result if prepared else None
        started = prepared.started if prepared else call.arrived
        self.request_log.record(
            Exchange(
                request_id=call.request_id,
                prompt=call.prompt,
                protocol=call.protocol,
                adapter=prepared.adapter_label if prepared else None,
                output=call.answer_text(result) if result else None,
                parameters=call.parameters.model_dump(exclude_none=True, exclude={"api_token", "prompt", "messages"}),
                prompt_tokens=result.prompt_tokens if result else None,
                generated_tokens=result.generated_tokens if result else None,
                latency_ms=(time.perf_counter() - started) * 1000,
                ttft_ms=result.time_to_first_token_s * 1000 if result else None,
                status=error.status_code if error else 200,
                outcome=error.outcome if error else ("success" if result else "cancelled"),
            )
        )


def _public(error: GenerationError, what: str) -> GenerationError:
    """The engine's failure as the client sees it: the engine's own text (a torch error) goes to the log only."""
    log.error("%s failed in the engine: %s", what, error.message)
    return GenerationError(f"generation failed in the engine ({what}); the server log has the details")


async def _prepend(first: Event, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    try:
        yield first
        async for event in events:
            yield event
    finally:
        await events.aclose()


def build_service(settings: ServeSettings) -> Service:
    """The engine, registry and server settings `stillhouse serve` runs (provisions the base first)."""
    from serving import base_models
    from serving.registry import default_registry_dir

    base_dir = base_models.provision(settings.base)
    model_name = base_models.base_identity(base_dir).name
    registry = Registry(settings.registry or default_registry_dir())
    if settings.engine == "vllm":
        engine = _vllm_engine(settings, base_dir, model_name, registry)
    else:
        import torch

        dtype = getattr(torch, resolve_dtype(settings.dtype))
        shared = {"max_queue": settings.max_queue, "max_total_tokens": settings.max_total_tokens, "dtype": dtype, "threads": settings.threads}
        if settings.engine == "peft":
            from serving.engines.peft_engine import PeftEngine

            engine = PeftEngine(base_dir, model_name, max_active_adapters=settings.max_active_adapters, **shared)
        else:
            from serving.engines.torch_engine import TorchEngine

            engine = TorchEngine(
                base_dir,
                model_name,
                max_active_adapters=settings.max_active_adapters,
                max_cpu_adapters=settings.max_cpu_adapters,
                **shared,
            )
    return Service(engine=engine, registry=registry, base_dir=base_dir, settings=settings.server)


def _vllm_engine(settings: ServeSettings, base_dir: Path, model_name: str, registry: Registry) -> Engine:
    """A vLLM engine whose --max-lora-rank covers the registry's adapters within the profile."""
    from serving.engines.vllm_engine import VllmEngine
    from serving.engines.vllm_process import max_lora_rank_for

    ranks = [int(e.metadata["rank"]) for e in registry.list() if e.metadata.get("rank")]
    return VllmEngine(
        base_dir,
        model_name,
        url=settings.engine_url,
        max_queue=settings.max_queue,
        max_active_adapters=settings.max_active_adapters,
        max_total_tokens=settings.max_total_tokens,
        max_lora_rank=max_lora_rank_for(ranks, servability.get_profile(settings.server.profile).ranks),
        dtype=resolve_dtype(settings.dtype),
    )
