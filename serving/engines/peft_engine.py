"""The baseline engine: transformers ``generate`` on one ``PeftModel`` holding every active adapter.

It exists to be measured against (``bench/engines.py``): the way a peft user serves many adapters
without a serving engine. Requests are batched statically: while a batch runs, newcomers wait;
then up to ``max_batch`` waiting greedy requests (whatever adapters they use) run together in one
left-padded ``generate`` with peft's mixed-adapter ``adapter_names=`` (``"__base__"`` for rows
without one), until the last of them finishes. A sampled request runs on its own, so its seed
reproduces it. Tokens stream as ``generate`` produces them, and every stop rule is ours
(``TokenStream``), so text and finish reasons match the other engines.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from serving.engines.adapter_lru import AdapterLRU
from serving.engines.base import (
    AdapterRef,
    Engine,
    Event,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
    max_total_tokens_for,
    resolve_seed,
)
from serving.engines.model_text import ModelText, text_config
from serving.engines.token_stream import TokenStream
from serving.engines.torch_engine import default_threads
from serving.errors import GenerationError, IncompleteGenerationError, OverloadedError, ServingError, ValidationError

log = logging.getLogger(__name__)

#: the name peft's mixed-batch inference gives rows that use the base model
BASE_ROW = "__base__"


@dataclass(eq=False)
class _Row:
    """One request: its stream state and the channel its events go back through."""

    request: GenerationRequest
    stream: TokenStream
    seed: int | None
    enqueued_at: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    admitted_at: float = 0.0
    logprobs: torch.Tensor | None = None  # this step's log-probabilities, from the processed scores
    cancelled: bool = False
    done: bool = False

    def send(self, event: Event | ServingError) -> None:
        """Hand an event to the consumer's event loop (called on the generate thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _Record(LogitsProcessor):
    """The last processor: keeps each row's log-probabilities, so a token's logprob is what it was chosen from."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs = torch.log_softmax(scores, dim=-1)
        for row, values in zip(self.rows, logprobs):
            row.logprobs = values
        return scores


class _Emit(StoppingCriteria):
    """Streams each row's new token and says which rows are finished (by our rules, cancelled, or stopping)."""

    def __init__(self, rows: list[_Row], stopping: list[bool]):
        self.rows, self.stopping = rows, stopping

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        for row, token_id in zip(self.rows, input_ids[:, -1].tolist()):
            if row.done or row.cancelled:
                row.done = True
                continue
            row.send(TokenEvent(row.stream.push(token_id, float(row.logprobs[token_id]))))
            if row.stream.finish_reason is not None:
                row.done = True
                row.send(row.stream.result(
                    prompt_tokens=len(row.request.prompt_ids), seed=row.seed, prefill=[],
                    enqueued_at=row.enqueued_at, admitted_at=row.admitted_at,
                ))  # fmt: skip
        finished = [row.done or self.stopping[0] for row in self.rows]
        return torch.tensor(finished, dtype=torch.bool, device=input_ids.device)


def refusal(request: GenerationRequest) -> str | None:
    """Why this engine cannot serve ``request`` (naming the request field), or None."""
    params = request.params
    if request.constraint is not None:
        return f"`{request.constraint.spec.field}` (structured output)"
    if params.typical_p is not None and params.typical_p < 1.0:
        return "`typical_p`"
    if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
        return "`repetition_penalty`"
    if params.prefill_logprobs:
        return "`decoder_input_details` (prompt log-probabilities)"
    if params.alternatives is not None:
        return "`return_k_alternatives` / `logprobs` (alternative tokens)"
    return None


class PeftEngine(Engine):
    """HF ``generate`` over a ``PeftModel`` with up to ``max_active_adapters`` adapters, static batches of ``max_batch``.

    ``max_queue`` bounds the requests waiting or running (beyond it ``generate`` raises
    ``OverloadedError``). Adapters beyond ``max_active_adapters`` are deleted from the model,
    least recently used first, never while a batch uses them.
    """

    def __init__(
        self,
        base_dir: Path,
        model_name: str,
        *,
        max_queue: int = 64,
        max_active_adapters: int = 8,
        max_batch: int = 16,
        max_total_tokens: int | None = None,
        dtype: torch.dtype = torch.float32,
        threads: int | None = None,
    ):
        self.model_name = model_name
        self._base_dir = Path(base_dir)
        self._config = text_config(self._base_dir)
        self.text = ModelText(self._base_dir, self._config)
        self.max_total_tokens = max_total_tokens_for(self._config, max_total_tokens)
        self._max_queue, self._max_batch, self._dtype = max_queue, max_batch, dtype
        self._threads = threads or default_threads()
        self._pad_id = self.text.tokenizer.pad_token_id or 0
        self._model: torch.nn.Module | None = None  # the base until the first adapter, then the PeftModel
        self._adapters = AdapterLRU(max_active_adapters)
        self._names: dict[str, str] = {}  # adapter id -> peft adapter name (peft names may not hold dots)
        self._serial = itertools.count()
        self._waiting: deque[_Row] = deque()
        self._wake = asyncio.Event()
        self._model_lock = asyncio.Lock()  # one generate or adapter change at a time
        self._stopping = [False]  # read by the generate thread between tokens
        self._batcher: asyncio.Task | None = None
        self._depth = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the base model (off the event loop) and start batching."""
        if self._batcher is not None:
            return
        torch.set_num_threads(self._threads)
        log.info("peft engine: %s, %d threads, batches of up to %d", self._dtype, self._threads, self._max_batch)
        model = await asyncio.to_thread(AutoModelForCausalLM.from_pretrained, self._base_dir, dtype=self._dtype)
        self._model = model.eval()
        self._stopping[0] = False
        self._wake = asyncio.Event()
        self._batcher = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        """Stop batching; requests still waiting or running fail with IncompleteGenerationError."""
        self._stopping[0] = True
        if self._batcher is not None:
            self._batcher.cancel()
            try:
                await self._batcher
            except asyncio.CancelledError:
                pass
            self._batcher = None
        async with self._model_lock:  # the running generate ends at its next token
            pass
        while self._waiting:
            self._fail(self._waiting.popleft(), IncompleteGenerationError("the engine stopped before the generation finished"))
            self._depth -= 1

    # -- adapters --------------------------------------------------------------------------

    async def load_adapter(self, adapter: AdapterRef) -> float:
        """Add an adapter to the PeftModel; returns the load time in seconds (0 if already active)."""
        async with self._model_lock:
            return await self._load(adapter)

    async def pin_adapter(self, adapter: AdapterRef) -> float:
        async with self._model_lock:
            seconds = await self._load(adapter)
            self._adapters.pin(adapter.adapter_id)  # a request that never ends
            return seconds

    async def _load(self, adapter: AdapterRef) -> float:
        if self._adapters.touch(adapter.adapter_id):
            return 0.0
        for idle in self._adapters.make_room():
            self._delete(idle)
        started = time.perf_counter()
        name = f"adapter{next(self._serial)}"
        try:
            await asyncio.to_thread(self._read, adapter.path, name)
        except Exception as exc:
            raise GenerationError(f"could not load adapter {adapter.adapter_id}: {exc}") from exc
        self._names[adapter.adapter_id] = name
        self._adapters.add(adapter.adapter_id)
        return max(time.perf_counter() - started, 1e-6)

    def _read(self, path: Path, name: str) -> None:
        if isinstance(self._model, PeftModel):
            self._model.load_adapter(path, adapter_name=name)
            self._model.set_adapter(name)  # peft needs an active adapter; the rows name their own
        else:
            self._model = PeftModel.from_pretrained(self._model, path, adapter_name=name)
        self._model.eval()

    def _delete(self, adapter_id: str) -> None:
        name = self._names.pop(adapter_id)
        if self._names:
            self._model.delete_adapter(name)
        else:  # peft cannot run without an adapter: back to the bare base
            self._model = self._model.unload()

    async def unload_adapter(self, adapter_id: str) -> bool:
        """Delete an adapter now, or after the batch using it; returns whether it was active."""
        async with self._model_lock:
            resident, dropped = self._adapters.unload(adapter_id)
            for gone in dropped:
                self._delete(gone)
            return resident

    def resident_adapters(self) -> list[str]:
        """Canonical ids of the adapters in the PeftModel now."""
        return list(self._adapters.ids)

    def queue_depth(self) -> int:
        """Requests waiting or running now."""
        return self._depth

    # -- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Yield a ``TokenEvent`` per token, then one ``GenerationResult``.

        Raises ``ValidationError`` naming the field of a feature this engine lacks, and
        ``OverloadedError`` when ``max_queue`` requests are already waiting or running.
        Closing the stream early drops the row at the next token.
        """
        self.check_length(request)
        unsupported = refusal(request)
        if unsupported:
            raise ValidationError(f"{unsupported} is not supported by the peft engine; use --engine torch")
        if self._batcher is None:
            raise GenerationError("the engine is not running")
        if self._depth >= self._max_queue:
            raise OverloadedError(f"the request queue is full ({self._max_queue}); retry later")
        row = _Row(
            request=request,
            stream=TokenStream(self.text, request.params, self.text.eos_token_ids),
            seed=resolve_seed(request.params),
            enqueued_at=time.perf_counter(),
            loop=asyncio.get_running_loop(),
        )
        self._depth += 1
        self._waiting.append(row)
        self._wake.set()
        try:
            while True:
                event = await row.events.get()
                if isinstance(event, ServingError):
                    raise event
                yield event
                if isinstance(event, GenerationResult):
                    return
        finally:
            row.cancelled = True
            if row in self._waiting:
                self._waiting.remove(row)
                self._depth -= 1

    def _next_batch(self) -> list[_Row]:
        """The oldest waiting request and, if it is greedy, the greedy ones after it, within the batch and adapter caps."""
        first = self._waiting.popleft()
        batch = [first]
        adapters = {first.request.adapter.adapter_id} if first.request.adapter else set()
        if first.request.params.sampling:
            return batch
        for row in list(self._waiting):
            if len(batch) >= self._max_batch:
                break
            adapter_id = row.request.adapter.adapter_id if row.request.adapter else None
            if row.request.params.sampling or (adapter_id and adapter_id not in adapters and len(adapters) >= self._adapters.capacity):
                continue
            if adapter_id:
                adapters.add(adapter_id)
            self._waiting.remove(row)
            batch.append(row)
        return batch

    async def _batch_loop(self) -> None:
        while True:
            while not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            batch = self._next_batch()
            try:
                async with self._model_lock:
                    await self._run(batch)
            finally:
                self._depth -= len(batch)

    async def _run(self, batch: list[_Row]) -> None:
        """Make the batch's adapters active, pinned, and run it; a failure fails every row still running."""
        pinned: list[str] = []
        try:
            for adapter in {r.request.adapter.adapter_id: r.request.adapter for r in batch if r.request.adapter}.values():
                await self._load(adapter)
                self._adapters.pin(adapter.adapter_id)
                pinned.append(adapter.adapter_id)
            await asyncio.to_thread(self._generate, batch)
        except asyncio.CancelledError:
            for row in batch:
                self._fail(row, IncompleteGenerationError("the engine stopped before the generation finished"))
            raise
        except Exception as exc:
            log.exception("peft generate failed")
            error = exc if isinstance(exc, ServingError) else GenerationError(f"generation failed: {exc}")
            for row in batch:
                self._fail(row, error)
        finally:
            for adapter_id in pinned:
                for gone in self._adapters.release(adapter_id):
                    self._delete(gone)
        for row in batch:
            if not row.done:  # the engine is stopping
                self._fail(row, IncompleteGenerationError("the engine stopped before the generation finished"))

    def _generate(self, batch: list[_Row]) -> None:
        """One left-padded ``generate`` for the batch; tokens stream from the stopping criteria."""
        now = time.perf_counter()
        for row in batch:
            row.admitted_at = now
        width = max(len(r.request.prompt_ids) for r in batch)
        input_ids = torch.tensor([[self._pad_id] * (width - len(r.request.prompt_ids)) + r.request.prompt_ids for r in batch])
        attention_mask = torch.tensor([[0] * (width - len(r.request.prompt_ids)) + [1] * len(r.request.prompt_ids) for r in batch])
        params = batch[0].request.params  # a sampled batch has one row
        processors = []
        if params.sampling:
            torch.manual_seed(batch[0].seed)
            if params.temperature:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p is not None and params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
        kwargs = {}
        if isinstance(self._model, PeftModel):
            kwargs["adapter_names"] = [self._names[r.request.adapter.adapter_id] if r.request.adapter else BASE_ROW for r in batch]
        with torch.inference_mode():
            self._model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(r.request.params.max_new_tokens for r in batch),
                # every knob explicit: the model's generation config would otherwise fill them in
                do_sample=params.sampling, temperature=1.0, top_k=None, top_p=1.0,
                eos_token_id=None, pad_token_id=self._pad_id,
                logits_processor=LogitsProcessorList([*processors, _Record(batch)]),
                stopping_criteria=StoppingCriteriaList([_Emit(batch, self._stopping)]),
                **kwargs,
            )  # fmt: skip

    def _fail(self, row: _Row, error: ServingError) -> None:
        if not row.done:
            row.done = True
            row.send(error)
