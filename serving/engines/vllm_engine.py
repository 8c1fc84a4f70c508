"""The vLLM engine: the same adapters served by a real vLLM OpenAI server in its own venv.

``VllmProcess`` launches ``python -m vllm.entrypoints.openai.api_server`` from ``.venv-vllm``
as a child on a free loopback port and makes sure it dies with us: its own process group
(killed on ``stop`` and at exit) and ``PR_SET_PDEATHSIG`` (the kernel sends it SIGTERM when
this process dies, SIGKILL included). ``VllmEngine`` speaks to it over HTTP only, so the main
environment never imports vllm. Tokenization and detokenization stay ours: vLLM gets prompt
token ids and returns token ids, which keeps text identical across engines.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import AsyncIterator

import httpx
from transformers import AutoConfig

from serving.engines.base import (
    AdapterRef,
    Alternative,
    Engine,
    Event,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    PrefillToken,
    TokenEvent,
    TokenInfo,
)
from serving.engines.detokenizer import IncrementalDetokenizer
from serving.engines.model_text import ModelText
from serving.engines.vllm_install import DEFAULT_VENV, venv_python
from serving.errors import (
    AdapterNotServableError,
    GenerationError,
    IncompleteGenerationError,
    OverloadedError,
    ValidationError,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_TOTAL_TOKENS = 8192
# Values vLLM's --max-lora-rank accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's own default; a larger max rank costs every LoRA slot memory and time (vLLM PR #22782).
MIN_MAX_LORA_RANK = 16
LOG_TAIL_LINES = 30
_PR_SET_PDEATHSIG = 1


def max_lora_rank_for(ranks: list[int], profile_ranks: frozenset[int] | None = None) -> int:
    """The --max-lora-rank to launch vLLM with: the smallest vLLM value covering the adapters in use.

    At least ``MIN_MAX_LORA_RANK``; never above the profile's largest rank (64 for strict), since
    adapters above it are refused before they reach vLLM.
    """
    needed = max([MIN_MAX_LORA_RANK, *ranks])
    if profile_ranks:
        needed = min(needed, max(max(profile_ranks), MIN_MAX_LORA_RANK))
    return next((r for r in VLLM_LORA_RANKS if r >= needed), VLLM_LORA_RANKS[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: own process group, and SIGTERM when the parent dies."""
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class VllmProcess:
    """A vLLM OpenAI server running as our child on a loopback port."""

    def __init__(
        self,
        base_dir: Path,
        served_name: str,
        *,
        venv: Path = DEFAULT_VENV,
        dtype: str = "float32",
        max_model_len: int = DEFAULT_MAX_TOTAL_TOKENS,
        max_lora_rank: int = MIN_MAX_LORA_RANK,
        max_loras: int = 4,
        max_cpu_loras: int = 8,
        max_num_seqs: int = 64,
        cpu: bool = True,
        kv_cache_gib: int = 2,
        extra_args: tuple[str, ...] = (),
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        python = venv_python(venv)
        if not python.exists():
            raise GenerationError(f"no vLLM venv at {venv}: run `stillhouse engines install vllm` (or `make vllm`)")
        self.command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(base_dir),
            "--served-model-name", served_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--dtype", dtype,
            "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(max_num_seqs),
            "--enable-lora",
            "--max-lora-rank", str(max_lora_rank),
            "--max-loras", str(max_loras),
            "--max-cpu-loras", str(max(max_cpu_loras, max_loras)),
            "--generation-config", "auto",
            "--uvicorn-log-level", "warning",
            *(["--gpu-memory-utilization", "0.4"] if cpu else []),
            *extra_args,
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib)),
            "PYTHONUNBUFFERED": "1",
        }
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def launch(self) -> None:
        """Start the child (call from a long-lived thread: PDEATHSIG follows the thread that forks)."""
        fd, name = tempfile.mkstemp(prefix="stillhouse-vllm-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=self.env, preexec_fn=_die_with_parent,
            )  # fmt: skip
        _LIVE.add(self)
        print(f"vllm: pid {self.process.pid} starting on {self.url} (log {self.log_path})", file=sys.stderr, flush=True)

    async def wait_healthy(self, timeout_s: float) -> None:
        """Poll /health until it answers 200; on timeout or exit, raise with the child's last log lines."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                if self.process.poll() is not None:
                    raise GenerationError(
                        f"the vLLM server exited with code {self.process.returncode} while starting:\n{self.log_tail()}"
                    )
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.terminate()
                    raise GenerationError(f"the vLLM server was not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")
                await asyncio.sleep(0.5)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def terminate(self, grace_s: float = 20) -> None:
        """Stop the child and everything it started (its process group): SIGTERM, then SIGKILL."""
        process, self.process = self.process, None
        _LIVE.discard(self)
        if process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace_s)
                # the group may outlive its leader: make sure the engine-core workers go too
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break
        if process.poll() is None:
            process.wait(timeout=5)


_LIVE: weakref.WeakSet[VllmProcess] = weakref.WeakSet()


@atexit.register
def _terminate_children() -> None:
    for process in list(_LIVE):
        process.terminate(grace_s=10)


class VllmEngine(Engine):
    """Generation by a vLLM OpenAI server, launched as our child or attached to with ``url``.

    Adapters are loaded into vLLM on demand through ``/v1/load_lora_adapter`` under their
    canonical ids and unloaded, least recently used first, beyond ``max_resident_adapters``.
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
        max_resident_adapters: int = 8,
        max_loras: int = 4,
        max_lora_rank: int = MIN_MAX_LORA_RANK,
        max_total_tokens: int | None = None,
        dtype: str = "float32",
        cpu: bool | None = None,
        startup_timeout_s: float = 600,
    ):
        self.model_name = model_name
        self._base_dir = Path(base_dir)
        config = AutoConfig.from_pretrained(self._base_dir).get_text_config(decoder=True)
        self.text = ModelText(self._base_dir, config)
        self._tokenizer = self.text.tokenizer
        model_limit = getattr(config, "max_position_embeddings", DEFAULT_MAX_TOTAL_TOKENS)
        self.max_total_tokens = max_total_tokens or min(model_limit, DEFAULT_MAX_TOTAL_TOKENS)
        self.eos_token_ids = self.text.eos_token_ids
        self._special_ids = self.text.special_ids
        self.max_lora_rank = max_lora_rank
        self._max_queue = max_queue
        self._capacity = max_resident_adapters
        self._startup_timeout_s = startup_timeout_s
        self._url = url.rstrip("/") if url else None
        self.process: VllmProcess | None = None
        if url is None:
            if cpu is None:
                from serving.engines.vllm_install import has_cuda

                cpu = not has_cuda()
            self.process = VllmProcess(
                self._base_dir, model_name, venv=venv, dtype=dtype, max_model_len=self.max_total_tokens,
                max_lora_rank=max_lora_rank, max_loras=max_loras, max_cpu_loras=max_resident_adapters,
                max_num_seqs=max_queue, cpu=cpu,
            )  # fmt: skip
        self._served_name = model_name
        self._resident: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU first
        self._users: collections.Counter[str] = collections.Counter()
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

    async def _load(self, adapter: AdapterRef) -> float:
        if adapter.adapter_id in self._resident:
            self._resident.move_to_end(adapter.adapter_id)
            return 0.0
        self._check_rank(adapter)
        await self._evict(room_for=1)
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
        self._resident[adapter.adapter_id] = None
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

    async def _evict(self, room_for: int) -> None:
        while len(self._resident) + room_for > self._capacity:
            idle = next((a for a in self._resident if not self._users[a]), None)
            if idle is None:
                return
            log.info("evicting adapter %s from vLLM (least recently used)", idle)
            await self._unload(idle)

    async def unload_adapter(self, adapter_id: str) -> bool:
        """Unload an adapter from vLLM; returns whether it was resident."""
        async with self._lock():
            if adapter_id not in self._resident:
                return False
            await self._unload(adapter_id)
            return True

    async def _unload(self, adapter_id: str) -> None:
        self._resident.pop(adapter_id, None)
        response = await self._client().post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": adapter_id})
        if response.status_code not in (200, 404):
            log.warning("vLLM did not unload %s: %s", adapter_id, _vllm_message(response))

    def resident_adapters(self) -> list[str]:
        """Canonical ids of the adapters loaded into vLLM now."""
        return list(self._resident)

    def queue_depth(self) -> int:
        """Requests in flight now."""
        return self._depth

    # -- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream one completion from vLLM as ``TokenEvent``s, then a ``GenerationResult``."""
        params = request.params
        if not request.prompt_ids:
            raise ValidationError("the prompt is empty")
        if len(request.prompt_ids) + params.max_new_tokens > self.max_total_tokens:
            raise ValidationError(
                f"prompt tokens ({len(request.prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) "
                f"must be <= {self.max_total_tokens}"
            )
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
                    self._users[adapter_id] += 1  # never evicted while a request uses it
                    pinned = True
            async for event in self._stream(request):
                yield event
        finally:
            self._depth -= 1
            if pinned:
                self._users[adapter_id] -= 1

    def _body(self, request: GenerationRequest, seed: int | None) -> dict:
        params = request.params
        body = {
            "model": request.adapter.adapter_id if request.adapter else self._served_name,
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
        return body

    async def _prefill_logprobs(self, request: GenerationRequest) -> list:
        """Prompt-token log-probabilities: vLLM gives them only without streaming, so ask once apart."""
        body = {
            "model": request.adapter.adapter_id if request.adapter else self._served_name,
            "prompt": request.prompt_ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 1,
        }
        response = await self._client().post(f"{self.url}/v1/completions", json=body)
        if response.status_code != 200:
            raise _error_for(response, request)
        return self._prefill(request.prompt_ids, response.json()["choices"][0].get("prompt_logprobs") or [])

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[Event]:
        params = request.params
        seed = None
        if params.sampling:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "big")
        enqueued = time.perf_counter()
        first_token_at = 0.0
        detokenizer = IncrementalDetokenizer(self.decode)
        generated: list[int] = []
        tokens: list[TokenInfo] = []
        text = ""
        finish: FinishReason | None = None
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
                        generated.append(token_id)
                        piece = detokenizer.push(token_id)
                        text += piece
                        last = i == len(ids) - 1
                        finish = self._finish_reason(params, generated, token_id, text, piece)
                        if finish is None and last and choice.get("finish_reason"):
                            finish = _map_finish(choice)
                        if finish is not None:
                            tail = detokenizer.flush()
                            piece += tail
                            text += tail
                        first_token_at = first_token_at or time.perf_counter()
                        logprob = float(score) if score is not None else float("nan")
                        token = TokenInfo(
                            id=token_id,
                            text=piece,
                            logprob=logprob,
                            special=token_id in self._special_ids,
                            alternatives=self._alternatives(tops[i] if i < len(tops) else None, params.alternatives),
                        )
                        tokens.append(token)
                        yield TokenEvent(token)
                        if finish is not None:
                            break
                    if finish is not None:
                        break
        except httpx.TransportError as exc:
            raise IncompleteGenerationError(f"the vLLM server stopped answering: {exc}") from exc
        if finish is None:
            raise IncompleteGenerationError("the vLLM stream ended before the generation finished")
        now = time.perf_counter()
        yield GenerationResult(
            generated_text=self.decode(generated),
            finish_reason=finish,
            prompt_tokens=len(request.prompt_ids),
            generated_tokens=len(generated),
            seed=seed,
            tokens=tokens,
            prefill=prefill,
            queue_time_s=0.0,
            time_to_first_token_s=(first_token_at or now) - enqueued,
            total_time_s=now - enqueued,
        )

    def _alternatives(self, top: dict | None, k: int | None) -> tuple[Alternative, ...] | None:
        """The ``k`` best of vLLM's ``{"token_id:<id>": logprob}`` (which also holds the chosen token)."""
        if k is None:
            return None
        ranked = sorted(((int(key.rsplit(":", 1)[-1]), float(value)) for key, value in (top or {}).items()), key=lambda p: -p[1])
        return tuple(
            Alternative(id=token_id, text=self._token_text(token_id), logprob=logprob)
            for token_id, logprob in ranked[:k]
            if logprob != float("-inf")
        )

    def _token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _finish_reason(self, params, generated: list[int], token_id: int, text: str, piece: str) -> FinishReason | None:
        """The torch engine's stop rules, applied to our own text so both engines stop alike."""
        if not params.ignore_eos_token and token_id in self.eos_token_ids:
            return "eos_token"
        if piece and params.stop:
            window = text[-(len(piece) + max(map(len, params.stop)) - 1) :]
            if any(stop in window for stop in params.stop):
                return "stop_sequence"
        if len(generated) >= params.max_new_tokens:
            return "length"
        return None

    def _prefill(self, prompt_ids: list[int], prompt_logprobs: list) -> list[PrefillToken]:
        result = []
        for position, token_id in enumerate(prompt_ids):
            entry = prompt_logprobs[position] if position < len(prompt_logprobs) else None
            logprob = None
            if entry:
                found = entry.get(str(token_id)) or entry.get(f"token_id:{token_id}")
                logprob = float(found["logprob"]) if found else None
            text = self._tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            result.append(PrefillToken(id=token_id, text=text, logprob=logprob if position else None))
        return result


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
