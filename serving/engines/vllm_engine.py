"""The vLLM engine: the same adapters served by a real vLLM OpenAI server in its own venv.

``VllmEngine`` speaks to vLLM over HTTP only, so the main environment never imports vllm: to a
``VllmProcess`` it launches (``serving.engines.vllm_process``) or to a server it attaches to.
Tokenization and detokenization stay ours: vLLM gets prompt token ids and returns token ids,
and the stop rules, text pieces and adapter residency are the torch engine's, so text and
behaviour stay identical across engines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import AsyncIterator

import httpx

from serving.engines.adapter_lru import AdapterLRU
from serving.engines.base import (
    AdapterRef,
    Alternative,
    Engine,
    Event,
    FinishReason,
    GenerationRequest,
    TokenEvent,
    max_total_tokens_for,
    resolve_seed,
)
from serving.engines.model_text import ModelText, text_config
from serving.engines.token_stream import TokenStream
from serving.engines.vllm_install import DEFAULT_VENV
from serving.engines.vllm_process import MIN_MAX_LORA_RANK, VllmProcess
from serving.errors import (
    AdapterNotServableError,
    GenerationError,
    IncompleteGenerationError,
    OverloadedError,
    ValidationError,
)

log = logging.getLogger(__name__)

#: structured output as the torch engine compiles it: xgrammar, compact JSON (``constraint.JSON_SEPARATORS``)
STRUCTURED_OUTPUTS_ARGS = ("--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}))


class VllmEngine(Engine):
    """Generation by a vLLM OpenAI server, launched as our child or attached to with ``url``.

    Adapters are loaded into vLLM on demand through ``/v1/load_lora_adapter`` under their
    canonical ids and unloaded, least recently used first, beyond ``max_active_adapters``
    (never while a request uses them).
    ``max_queue`` bounds the requests in flight (beyond it ``generate`` raises
    ``OverloadedError``). ``dtype`` float32 matches the torch engine bit for bit where the
    kernels allow it.
    """

    def __init__(
        self,
        base_dir: Path,
        model_name: str,
        *,
        url: str | None = None,
        venv: Path = DEFAULT_VENV,
        max_queue: int = 64,
        max_active_adapters: int = 8,
        max_loras: int = 4,
        max_lora_rank: int = MIN_MAX_LORA_RANK,
        max_total_tokens: int | None = None,
        dtype: str = "float32",
        cpu: bool | None = None,
        startup_timeout_s: float = 600,
    ):
        self.model_name = model_name
        self._base_dir = Path(base_dir)
        config = text_config(self._base_dir)
        self.text = ModelText(self._base_dir, config)
        self.max_total_tokens = max_total_tokens_for(config, max_total_tokens)
        #: generated tokens that end a generation (tokenizer and generation config)
        self.eos_token_ids = self.text.eos_token_ids
        self.max_lora_rank = max_lora_rank
        self._max_queue = max_queue
        self._startup_timeout_s = startup_timeout_s
        self._url = url.rstrip("/") if url else None
        self.process: VllmProcess | None = None
        if url is None:
            if cpu is None:
                from serving.engines.vllm_install import has_cuda

                cpu = not has_cuda()
            self.process = VllmProcess(
                self._base_dir, model_name, venv=venv, dtype=dtype, max_model_len=self.max_total_tokens,
                max_lora_rank=max_lora_rank, max_loras=max_loras, max_cpu_loras=max_active_adapters,
                max_num_seqs=max_queue, cpu=cpu, extra_args=STRUCTURED_OUTPUTS_ARGS,
            )  # fmt: skip
        self._served_name = model_name
        self._adapters = AdapterLRU(max_active_adapters)
        # serialises loads and unloads, so vLLM and ``_adapters`` agree on what is resident
        self._adapter_lock: asyncio.Lock | None = None
        self._clients: dict[int, httpx.AsyncClient] = {}
        self._depth = 0
        self._running = False

    @property
    def url(self) -> str:
        return self._url or self.process.url

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch the vLLM child (or check the attached server) and wait until it is healthy."""
        if self._running:
            return
        if self.process is not None:
            self.process.launch()
            await self.process.wait_healthy(self._startup_timeout_s)
        else:
            await self._attach()
        self._running = True

    async def _attach(self) -> None:
        try:
            response = await self._client().get(f"{self.url}/v1/models", timeout=30)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise GenerationError(f"no vLLM server answers at {self.url}: {exc}") from exc
        names = [m["id"] for m in response.json()["data"] if not m.get("parent")]
        if self.model_name not in names and names:
            self._served_name = names[0]  # started with another --served-model-name

    async def stop(self) -> None:
        """Stop the launched child (an attached server keeps running)."""
        self._running = False
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.aclose()
            except RuntimeError:  # created on an event loop that is gone
                pass
        if self.process is not None:
            await asyncio.to_thread(self.process.terminate)

    def _client(self) -> httpx.AsyncClient:
        """One connection pool per event loop (a client cannot cross loops)."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(id(loop))
        if client is None or client.is_closed:
            limits = httpx.Limits(max_connections=self._max_queue + 8, max_keepalive_connections=self._max_queue + 8)
            client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10), limits=limits)
            self._clients[id(loop)] = client
        return client

    # -- adapters --------------------------------------------------------------------------

    def _lock(self) -> asyncio.Lock:
        if self._adapter_lock is None:
            self._adapter_lock = asyncio.Lock()
        return self._adapter_lock

    async def load_adapter(self, adapter: AdapterRef) -> float:
        """Load an adapter into vLLM; returns the load time in seconds (0 if already resident).

        Raises ``AdapterNotServableError`` with vLLM's own message when vLLM refuses it.
        """
        async with self._lock():
            return await self._load(adapter)

    async def pin_adapter(self, adapter: AdapterRef) -> float:
        async with self._lock():
            seconds = await self._load(adapter)
            self._adapters.pin(adapter.adapter_id)  # a request that never ends
            return seconds

    async def _load(self, adapter: AdapterRef) -> float:
        if self._adapters.touch(adapter.adapter_id):
            return 0.0
        self._check_rank(adapter)
        for idle in self._adapters.make_room():
            await self._unload(idle)
        started = time.perf_counter()
        response = await self._client().post(
            f"{self.url}/v1/load_lora_adapter",
            json={"lora_name": adapter.adapter_id, "lora_path": str(adapter.path)},
        )
        if response.status_code != 200 and not _already_loaded(response):
            raise AdapterNotServableError(
                f"vLLM refused adapter {adapter.adapter_id} ({response.status_code}): {_vllm_message(response)}"
            )
        seconds = time.perf_counter() - started
        self._adapters.add(adapter.adapter_id)
        log.info("vLLM loaded adapter %s in %.3f s", adapter.adapter_id, seconds)
        return max(seconds, 1e-6)

    def _check_rank(self, adapter: AdapterRef) -> None:
        try:
            rank = int(json.loads((adapter.path / "adapter_config.json").read_text())["r"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # let vLLM say what is wrong with it
        if rank > self.max_lora_rank:
            raise AdapterNotServableError(
                f"adapter {adapter.adapter_id} has rank {rank} but this vLLM server was started with "
                f"--max-lora-rank {self.max_lora_rank}; restart the server so it sees the adapter in the registry"
            )

    async def unload_adapter(self, adapter_id: str) -> bool:
        """Unload an adapter from vLLM now, or when its last request finishes; returns whether it was resident."""
        async with self._lock():
            resident, dropped = self._adapters.unload(adapter_id)
            for gone in dropped:
                await self._unload(gone)
            return resident

    async def _release(self, adapter_id: str) -> None:
        """Unpin an adapter after a request; unload what that leaves to drop, unless it was loaded again since."""
        dropped = self._adapters.release(adapter_id)
        if dropped:
            async with self._lock():
                for gone in dropped:
                    if gone not in self._adapters:
                        await self._unload(gone)

    async def _unload(self, adapter_id: str) -> None:
        response = await self._client().post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": adapter_id})
        if response.status_code not in (200, 404):
            log.warning("vLLM did not unload %s: %s", adapter_id, _vllm_message(response))

    def resident_adapters(self) -> list[str]:
        """Canonical ids of the adapters loaded into vLLM now."""
        return list(self._adapters.ids)

    def queue_depth(self) -> int:
        """Requests in flight now."""
        return self._depth

    # -- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream one completion from vLLM as ``TokenEvent``s, then a ``GenerationResult``."""
        params = request.params
        self.check_length(request)
        if params.typical_p is not None and params.typical_p < 1.0:
            raise ValidationError("typical_p is not supported by the vllm engine; use top_p or top_k")
        if not self._running:
            raise GenerationError("the engine is not running")
        if self._depth >= self._max_queue:
            raise OverloadedError(f"the request queue is full ({self._max_queue}); retry later")
        self._depth += 1
        adapter_id = request.adapter.adapter_id if request.adapter else None
        pinned = False
        try:
            if adapter_id is not None:
                async with self._lock():
                    await self._load(request.adapter)
                    self._adapters.pin(adapter_id)
                    pinned = True
            async for event in self._stream(request):
                yield event
        finally:
            self._depth -= 1
            if pinned:
                await self._release(adapter_id)

    def _model(self, request: GenerationRequest) -> str:
        """The name vLLM serves the request's adapter (or the base) under."""
        return request.adapter.adapter_id if request.adapter else self._served_name

    def _body(self, request: GenerationRequest, seed: int | None) -> dict:
        params = request.params
        body = {
            "model": self._model(request),
            "prompt": request.prompt_ids,
            "max_tokens": params.max_new_tokens,
            "stream": True,
            # the chosen token's logprob, plus the alternatives the request asked for
            "logprobs": max(1, params.alternatives or 0),
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
            "ignore_eos": params.ignore_eos_token,
            "temperature": (params.temperature or 1.0) if params.sampling else 0.0,
        }
        if params.sampling:
            body["seed"] = seed
            if params.top_k:
                body["top_k"] = params.top_k
            if params.top_p is not None:
                body["top_p"] = params.top_p
        if params.repetition_penalty is not None:
            body["repetition_penalty"] = params.repetition_penalty
        if params.stop:
            body["stop"] = list(params.stop)
            body["include_stop_str_in_output"] = True
        if request.constraint is not None:
            body["structured_outputs"] = request.constraint.spec.vllm()
        return body

    async def _prefill_logprobs(self, request: GenerationRequest) -> list:
        """Prompt-token log-probabilities: vLLM gives them only without streaming, so ask once apart."""
        body = {
            "model": self._model(request),
            "prompt": request.prompt_ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 1,
        }
        response = await self._client().post(f"{self.url}/v1/completions", json=body)
        if response.status_code != 200:
            raise _error_for(response, request)
        entries = response.json()["choices"][0].get("prompt_logprobs") or []
        return self.text.prefill_tokens(request.prompt_ids, _prompt_logprobs(request.prompt_ids, entries))

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        params = request.params
        seed = resolve_seed(params)
        enqueued = time.perf_counter()
        stream = TokenStream(self.text, params, self.eos_token_ids)
        prefill = await self._prefill_logprobs(request) if params.prefill_logprobs else []
        try:
            async with self._client().stream(
                "POST", f"{self.url}/v1/completions", json=self._body(request, seed)
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _error_for(response, request)
                async for chunk in _sse_chunks(response):
                    if not chunk.get("choices"):
                        continue
                    choice = chunk["choices"][0]
                    logprobs = choice.get("logprobs") or {}
                    ids = [int(t.rsplit(":", 1)[-1]) for t in logprobs.get("tokens") or []]
                    scores = logprobs.get("token_logprobs") or [None] * len(ids)
                    tops = logprobs.get("top_logprobs") or [None] * len(ids)
                    for i, (token_id, score) in enumerate(zip(ids, scores)):
                        last = i == len(ids) - 1
                        upstream_finish = _map_finish(choice) if last and choice.get("finish_reason") else None
                        logprob = float(score) if score is not None else float("nan")
                        alternatives = self._alternatives(tops[i] if i < len(tops) else None, params.alternatives)
                        yield TokenEvent(stream.push(token_id, logprob, alternatives, upstream_finish))
                        if stream.finish_reason is not None:
                            break
                    if stream.finish_reason is not None:
                        break
        except httpx.TransportError as exc:
            raise IncompleteGenerationError(f"the vLLM server stopped answering: {exc}") from exc
        if stream.finish_reason is None:
            raise IncompleteGenerationError("the vLLM stream ended before the generation finished")
        yield stream.result(prompt_tokens=len(request.prompt_ids), seed=seed, prefill=prefill, enqueued_at=enqueued)

    def _alternatives(self, top: dict | None, k: int | None) -> tuple[Alternative, ...] | None:
        """The ``k`` best of vLLM's ``{"token_id:<id>": logprob}`` (which also holds the chosen token)."""
        if k is None:
            return None
        ranked = sorted(((int(key.rsplit(":", 1)[-1]), float(value)) for key, value in (top or {}).items()), key=lambda p: -p[1])
        return self.text.alternatives((token_id, logprob) for token_id, logprob in ranked[:k] if logprob != float("-inf"))


def _prompt_logprobs(prompt_ids: list[int], entries: list) -> list[float | None]:
    """Each prompt token's log-probability from vLLM's ``prompt_logprobs`` entries (None where absent)."""
    logprobs: list[float | None] = []
    for position, token_id in enumerate(prompt_ids):
        entry = entries[position] if position < len(entries) else None
        found = (entry.get(str(token_id)) or entry.get(f"token_id:{token_id}")) if entry else None
        logprobs.append(float(found["logprob"]) if found else None)
    return logprobs


async def _sse_chunks(response: httpx.Response) -> AsyncIterator[dict]:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk and not chunk.get("choices"):
            raise GenerationError(f"vLLM: {chunk['error'].get('message', chunk['error'])}")
        yield chunk


def _map_finish(choice: dict) -> FinishReason:
    if choice.get("finish_reason") == "length":
        return "length"
    if isinstance(choice.get("stop_reason"), str):
        return "stop_sequence"
    return "eos_token"


def _vllm_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message", error))
        return str(error)
    return str(body)


def _already_loaded(response: httpx.Response) -> bool:
    return response.status_code == 400 and "already" in _vllm_message(response).lower()


def _error_for(response: httpx.Response, request: GenerationRequest) -> Exception:
    message = f"vLLM answered {response.status_code}: {_vllm_message(response)}"
    if response.status_code == 400:
        return ValidationError(message)
    if response.status_code == 404 and request.adapter is not None:
        return GenerationError(f"adapter {request.adapter.adapter_id} is not loaded in vLLM: {message}")
    return GenerationError(message)
