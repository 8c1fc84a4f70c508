"""The embedded engine: a transformers causal LM plus peft LoRA adapters, in-process.

One worker thread owns the model, so forwards never overlap and torch keeps every core.
Each round it runs queued adapter loads and unloads, admits waiting requests (prefill),
then gives every active sequence one decode step, each with its own KV cache: requests for
different adapters therefore stream side by side. The event loop only enqueues requests;
events come back through ``call_soon_threadsafe`` into one ``asyncio.Queue`` per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from serving.engines.base import (
    AdapterRef,
    Engine,
    Event,
    GenerationRequest,
    GenerationResult,
    PrefillToken,
    TokenEvent,
    max_total_tokens_for,
    resolve_seed,
)
from serving.engines.constraint import TokenMatcher
from serving.engines.model_text import ModelText, text_config
from serving.engines.resident_adapters import ResidentAdapters
from serving.engines.sampling import choose_token_with_alternatives
from serving.engines.token_stream import TokenStream
from serving.errors import GenerationError, IncompleteGenerationError, OverloadedError, ServingError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Sequence:
    """One request on its way through the worker: decoding state plus its event channel."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    stream: TokenStream
    seed: int | None
    generator: torch.Generator | None
    enqueued_at: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    holds_adapter: bool = False
    cache: DynamicCache | None = None
    seen: torch.Tensor | None = None  # vocabulary mask for the repetition penalty
    prefill: list[PrefillToken] = field(default_factory=list)
    admitted_at: float = 0.0
    matcher: TokenMatcher | None = None  # structured output: which tokens the grammar allows next

    @property
    def adapter_id(self) -> str | None:
        return self.request.adapter.adapter_id if self.request.adapter else None

    def cancel(self) -> None:
        """Ask the worker to drop this sequence (its consumer is gone)."""
        self.cancelled = True

    def send(self, event: Event | ServingError) -> None:
        """Hand an event to the consumer's event loop (called on the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the consumer's loop is closed: nobody will read this
            self.cancelled = True


class TorchEngine(Engine):
    """A transformers model with any number of resident peft LoRA adapters, on CPU or one GPU.

    ``max_queue`` bounds the requests waiting or running (beyond it ``generate`` raises
    ``OverloadedError``); ``max_active`` bounds how many of them decode at once, each with
    its own KV cache.
    """

    def __init__(
        self,
        base_dir: Path,
        model_name: str,
        *,
        max_queue: int = 64,
        max_resident_adapters: int = 8,
        max_total_tokens: int | None = None,
        max_active: int = 16,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ):
        self.model_name = model_name
        self._base_dir = Path(base_dir)
        self._max_queue = max_queue
        self._max_active = max_active
        self._max_resident_adapters = max_resident_adapters
        self._dtype = dtype
        self._device = torch.device(device)
        self._config = text_config(self._base_dir)
        self.text = ModelText(self._base_dir, self._config)
        self.max_total_tokens = max_total_tokens_for(self._config, max_total_tokens)
        #: generated tokens that end a generation (tokenizer and generation config)
        self.eos_token_ids = self.text.eos_token_ids
        self._adapters: ResidentAdapters | None = None
        self._thread: threading.Thread | None = None
        # guards everything the event loop and the worker share: the fields below
        self._cond = threading.Condition()
        self._running = False
        self._waiting: deque[_Sequence] = deque()
        self._commands: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._depth = 0  # waiting + active
        self._active: list[_Sequence] = []  # worker thread only

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model (off the event loop) and start the worker thread."""
        if self._thread is not None:
            return
        model = await asyncio.to_thread(self._load_model)
        self._adapters = ResidentAdapters(model, self._max_resident_adapters)
        with self._cond:
            self._running = True
        self._thread = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the worker; requests still waiting or running fail with IncompleteGenerationError."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._adapters = None

    def _load_model(self) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(self._base_dir, dtype=self._dtype)
        return model.to(self._device).eval()

    # -- adapters --------------------------------------------------------------------------

    async def load_adapter(self, adapter: AdapterRef) -> float:
        """Make an adapter resident; returns the load time in seconds (0 if already resident)."""
        return await self._on_worker(lambda: self._adapters.load(adapter))

    async def unload_adapter(self, adapter_id: str) -> bool:
        """Drop a resident adapter (after its running requests finish); returns whether it was resident."""
        return await self._on_worker(lambda: self._adapters.unload(adapter_id))

    def resident_adapters(self) -> list[str]:
        """Canonical ids of the adapters resident now."""
        return list(self._adapters.ids) if self._adapters else []

    def queue_depth(self) -> int:
        """Requests waiting or running now."""
        return self._depth

    async def _on_worker(self, command: Callable[[], object]):
        """Run ``command`` on the worker between decode steps: it owns the model."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if not self._running:
                raise GenerationError("the engine is not running")
            self._commands.append((command, future))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    # -- generation: event-loop side -------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Yield a ``TokenEvent`` per token, then one ``GenerationResult``.

        The request is queued on the first iteration, which raises ``OverloadedError`` when
        ``max_queue`` requests are already waiting or running. Closing the stream early (a
        client that went away) drops the sequence from the worker.
        """
        sequence = self._enqueue(request)
        try:
            while True:
                event = await sequence.events.get()
                if isinstance(event, ServingError):
                    raise event
                yield event
                if isinstance(event, GenerationResult):
                    return
        finally:
            sequence.cancel()

    def _enqueue(self, request: GenerationRequest) -> _Sequence:
        self.check_length(request)
        seed = resolve_seed(request.params)
        generator = torch.Generator(self._device).manual_seed(seed) if seed is not None else None
        sequence = _Sequence(
            request=request,
            loop=asyncio.get_running_loop(),
            stream=TokenStream(self.text, request.params, self.eos_token_ids),
            seed=seed,
            generator=generator,
            enqueued_at=time.perf_counter(),
            matcher=request.constraint.matcher() if request.constraint else None,
        )
        with self._cond:
            if not self._running:
                raise GenerationError("the engine is not running")
            if self._depth >= self._max_queue:
                raise OverloadedError(f"the request queue is full ({self._max_queue}); retry later")
            self._waiting.append(sequence)
            self._depth += 1
            self._cond.notify()
        return sequence

    # -- generation: worker side -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._running and not (self._commands or self._waiting or self._active):
                    self._cond.wait()
                if not self._running:
                    break
                commands = list(self._commands)
                self._commands.clear()
                while self._waiting and len(self._active) < self._max_active:
                    self._active.append(self._waiting.popleft())
            for command, future in commands:
                self._run_command(command, future)
            for sequence in list(self._active):
                if not self._running:
                    break
                self._step(sequence)
        self._abandon_all()

    @staticmethod
    def _run_command(command: Callable[[], object], future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():  # the caller stopped waiting
            return
        try:
            future.set_result(command())
        except Exception as exc:
            log.exception("adapter command failed")
            future.set_exception(GenerationError(f"adapter operation failed: {exc}"))

    def _step(self, sequence: _Sequence) -> None:
        """Produce one token for ``sequence`` (its first one comes from the prefill)."""
        if sequence.cancelled:
            self._retire(sequence)
            return
        try:
            logits = self._prefill(sequence) if sequence.cache is None else self._decode_step(sequence)
            self._emit(sequence, logits)
        except ServingError as exc:
            sequence.send(exc)
            self._retire(sequence)
        except Exception as exc:
            log.exception("generation failed")
            sequence.send(GenerationError(f"generation failed: {exc}"))
            self._retire(sequence)

    def _prefill(self, sequence: _Sequence) -> torch.Tensor:
        sequence.admitted_at = time.perf_counter()
        adapter = sequence.request.adapter
        if adapter is not None:
            try:
                self._adapters.acquire(adapter)
            except Exception as exc:
                raise GenerationError(f"could not load adapter {adapter.adapter_id}: {exc}") from exc
            sequence.holds_adapter = True
        params = sequence.request.params
        prompt_ids = sequence.request.prompt_ids
        sequence.cache = DynamicCache(config=self._config)
        # logits for the last position only, as HF generate computes them, unless all are wanted
        logits = self._forward(sequence, prompt_ids, logits_to_keep=0 if params.prefill_logprobs else 1)
        if params.prefill_logprobs:
            sequence.prefill = self._prefill_tokens(prompt_ids, logits)
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            sequence.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=self._device)
            sequence.seen[prompt_ids] = True
        return logits[-1]

    def _decode_step(self, sequence: _Sequence) -> torch.Tensor:
        return self._forward(sequence, sequence.stream.ids[-1:], logits_to_keep=1)[-1]

    def _forward(self, sequence: _Sequence, new_ids: list[int], logits_to_keep: int) -> torch.Tensor:
        """Run ``new_ids`` through the model on top of the sequence's cache; logits ``[n, vocab]``."""
        past = sequence.cache.get_seq_length()
        positions = torch.arange(past, past + len(new_ids), device=self._device)
        with torch.inference_mode():
            output = self._adapters.model(
                input_ids=torch.tensor([new_ids], device=self._device),
                attention_mask=torch.ones(1, past + len(new_ids), dtype=torch.long, device=self._device),
                position_ids=positions.unsqueeze(0),
                cache_position=positions,
                past_key_values=sequence.cache,
                use_cache=True,
                logits_to_keep=logits_to_keep,
                **self._adapters.forward_kwargs([sequence.adapter_id]),
            )
        return output.logits[0].float()

    def _prefill_tokens(self, prompt_ids: list[int], logits: torch.Tensor) -> list[PrefillToken]:
        log_probs = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(prompt_ids[1:], device=log_probs.device)
        scores = [None] + log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).tolist()
        return self.text.prefill_tokens(prompt_ids, scores)

    def _emit(self, sequence: _Sequence, logits: torch.Tensor) -> None:
        """Choose the next token, stream it, and finish the sequence when a stop condition holds."""
        params = sequence.request.params
        if sequence.matcher is not None:
            sequence.matcher.mask(logits)
        token_id, logprob, ranked = choose_token_with_alternatives(
            logits, params, sequence.seen, sequence.generator, params.alternatives or 0
        )
        if sequence.matcher is not None:
            sequence.matcher.accept(token_id)
        if sequence.seen is not None:
            sequence.seen[token_id] = True
        alternatives = self.text.alternatives(ranked) if params.alternatives is not None else None
        sequence.send(TokenEvent(sequence.stream.push(token_id, logprob, alternatives)))
        if sequence.stream.finish_reason is not None:
            result = sequence.stream.result(
                prompt_tokens=len(sequence.request.prompt_ids),
                seed=sequence.seed,
                prefill=sequence.prefill,
                enqueued_at=sequence.enqueued_at,
                admitted_at=sequence.admitted_at,
            )
            sequence.send(result)
            self._retire(sequence)

    def _retire(self, sequence: _Sequence) -> None:
        """Forget a finished, failed or cancelled sequence and unpin its adapter."""
        if sequence in self._active:
            self._active.remove(sequence)
        if sequence.holds_adapter:
            sequence.holds_adapter = False
            self._adapters.release(sequence.adapter_id)
        sequence.cache = None
        with self._cond:
            self._depth -= 1

    def _abandon_all(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            commands = list(self._commands)
            self._commands.clear()
        for sequence in waiting + self._active:
            sequence.send(IncompleteGenerationError("the engine stopped before the generation finished"))
            self._retire(sequence)
        for _, future in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(IncompleteGenerationError("the engine stopped"))
