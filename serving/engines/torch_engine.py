"""The embedded engine: a transformers causal LM with batched multi-adapter LoRA, in-process.

One worker thread owns the model, so forwards never overlap and torch keeps every core. Each
step it runs queued adapter commands, admits waiting requests (round-robin by adapter), runs
one chunk of prompt prefill for newcomers, and then ONE decode forward for every running
sequence together, whatever adapter each uses (``lora_layers``). Newcomers whose prompts fit
the step's prefill budget are prefilled together, in one left-padded forward; a longer prompt
is prefilled on its own cache, a chunk per step so it never stalls the running streams. Then
they join the batch cache (``batch_cache``); a finished or cancelled sequence leaves it at the next
token boundary. The decode step's plain greedy rows share one argmax over the batch's logits
(``sampling.choose_greedy``), and in bfloat16 on CPU the linear layers run on prepacked
weights (``packed_linear``). The event loop only enqueues requests; events come back through
``call_soon_threadsafe`` into one ``asyncio.Queue`` per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import torch
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from serving.engines import packed_linear
from serving.engines.adapter_weights import AdapterWeights
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
from serving.engines.batch_cache import BatchCache, take_rows
from serving.engines.constraint import TokenMatcher
from serving.engines.fair_queue import FairQueue
from serving.engines.model_text import ModelText, text_config
from serving.engines.resident_adapters import ResidentAdapters
from serving.engines.sampling import choose_greedy, choose_token_with_alternatives, is_plain_greedy
from serving.engines.token_stream import TokenStream
from serving.errors import GenerationError, IncompleteGenerationError, OverloadedError, ServingError

log = logging.getLogger(__name__)

#: prompt tokens prefilled per engine step, across newcomers: bounds how long a step stalls decoding
DEFAULT_PREFILL_CHUNK = 256


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
    done: bool = False  # retired: no longer waiting, prefilling or decoding
    holds_adapter: bool = False
    loading: concurrent.futures.Future | None = None  # its adapter's weights, read off the worker
    cache: DynamicCache | None = None  # its own cache while it prefills alone (made at its first chunk); then a batch row
    length: int = 0  # tokens in its KV cache: the position of its next input token
    seen: torch.Tensor | None = None  # vocabulary mask for the repetition penalty
    prefill_scores: list[float | None] = field(default_factory=list)
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


def default_threads() -> int:
    """Torch threads for the engine: one per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class TorchEngine(Engine):
    """A transformers model serving any mix of resident LoRA adapters in one batch, on CPU or one GPU.

    ``max_queue`` bounds the requests waiting or running (beyond it ``generate`` raises
    ``OverloadedError``); ``max_active`` bounds how many of them decode at once, in one batch.
    ``max_active_adapters`` is the number of adapter slots of the batch; ``max_cpu_adapters``
    how many adapters read from disk stay in CPU memory for a fast reload.
    """

    def __init__(
        self,
        base_dir: Path,
        model_name: str,
        *,
        max_queue: int = 64,
        max_active_adapters: int = 8,
        max_cpu_adapters: int = 64,
        max_total_tokens: int | None = None,
        max_active: int = 16,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        threads: int | None = None,
    ):
        self.model_name = model_name
        self._base_dir = Path(base_dir)
        self._max_queue = max_queue
        self._max_active = max_active
        self._prefill_chunk = prefill_chunk
        self._max_active_adapters = max_active_adapters
        self._max_cpu_adapters = max_cpu_adapters
        self._dtype = dtype
        self._device = torch.device(device)
        self._threads = threads or default_threads()
        self._config = text_config(self._base_dir)
        self.text = ModelText(self._base_dir, self._config)
        self.max_total_tokens = max_total_tokens_for(self._config, max_total_tokens)
        #: generated tokens that end a generation (tokenizer and generation config)
        self.eos_token_ids = self.text.eos_token_ids
        self._adapters: ResidentAdapters | None = None
        self._loader: concurrent.futures.ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        # guards everything the event loop and the worker share: the fields below
        self._cond = threading.Condition()
        self._running = False
        self._waiting: FairQueue[_Sequence] = FairQueue()
        self._commands: deque[tuple[Callable[[], object], concurrent.futures.Future]] = deque()
        self._depth = 0  # waiting + admitted
        # worker thread only: admitted sequences waiting for their adapter, prefilling, decoding
        self._loading: list[_Sequence] = []
        self._prefilling: list[_Sequence] = []
        self._batch: list[_Sequence] = []
        self._cache = BatchCache(self._config, self._device)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model (off the event loop) and start the worker thread."""
        if self._thread is not None:
            return
        torch.set_num_threads(self._threads)
        log.info("torch engine: %s, %d threads", self._dtype, self._threads)
        model = await asyncio.to_thread(self._load_model)
        self._adapters = ResidentAdapters(model, self._max_active_adapters, self._max_cpu_adapters)
        if packed_linear.supported(self._dtype, self._device):
            layers = await asyncio.to_thread(packed_linear.pack, model)
            log.info("torch engine: %d linear layers prepacked for oneDNN", layers)
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")
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
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)
            self._loader = None
        self._adapters = None

    def _load_model(self) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(self._base_dir, dtype=self._dtype)
        return model.to(self._device).eval()

    # -- adapters --------------------------------------------------------------------------

    async def load_adapter(self, adapter: AdapterRef) -> float:
        """Make an adapter resident; returns the load time in seconds (0 if already resident).

        The weights are read off the worker (or come from the CPU cache); only the copy into
        an adapter slot waits for a token boundary.
        """
        if adapter.adapter_id in self.resident_adapters():
            return await self._on_worker(lambda: self._adapters.load(adapter, None))
        started = time.perf_counter()
        try:
            weights = await asyncio.to_thread(self._adapters.read, adapter)
        except Exception as exc:
            raise GenerationError(f"could not load adapter {adapter.adapter_id}: {exc}") from exc
        copy_seconds = await self._on_worker(lambda: self._adapters.load(adapter, weights))
        return time.perf_counter() - started if copy_seconds else 0.0

    async def pin_adapter(self, adapter: AdapterRef) -> float:
        seconds = await self.load_adapter(adapter)
        await self._on_worker(lambda: self._adapters.acquire(adapter))  # resident now: a request that never ends
        return seconds

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
        client that went away) drops the sequence from the worker at the next token boundary.
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
            with self._cond:
                self._cond.notify()  # a sequence waiting for its adapter is dropped without waiting for it

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
            self._waiting.push(sequence.adapter_id, sequence)
            self._depth += 1
            self._cond.notify()
        return sequence

    # -- generation: worker side -----------------------------------------------------------

    def _admitted(self) -> int:
        return len(self._loading) + len(self._prefilling) + len(self._batch)

    def _has_work(self) -> bool:
        return bool(
            self._commands
            or self._prefilling
            or self._batch
            or any(s.cancelled or s.loading.done() for s in self._loading)
            or (self._waiting and self._admitted() < self._max_active)
        )

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._running and not self._has_work():
                    self._cond.wait()
                if not self._running:
                    break
                commands = list(self._commands)
                self._commands.clear()
                admitted = []
                while self._waiting and self._admitted() + len(admitted) < self._max_active:
                    admitted.append(self._waiting.pop())
            for command, future in commands:
                self._run_command(command, future)
            for sequence in admitted:
                self._admit(sequence)
            self._finish_loads()
            self._prefill_step()
            self._decode_step()
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

    def _admit(self, sequence: _Sequence) -> None:
        """Start a sequence: pin its adapter (reading it off the worker when it is not in a slot)."""
        sequence.admitted_at = time.perf_counter()
        adapter = sequence.request.adapter
        if adapter is not None and adapter.adapter_id not in self._adapters:
            sequence.loading = self._loader.submit(self._adapters.read, adapter)
            sequence.loading.add_done_callback(lambda _: self._wake())
            self._loading.append(sequence)
            return
        self._start_prefill(sequence, None)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _finish_loads(self) -> None:
        for sequence in [s for s in self._loading if s.cancelled or s.loading.done()]:
            self._loading.remove(sequence)
            if sequence.cancelled:
                self._retire(sequence)
                continue
            try:
                weights = sequence.loading.result()
            except Exception as exc:
                self._fail(sequence, GenerationError(f"could not load adapter {sequence.adapter_id}: {exc}"))
                continue
            self._start_prefill(sequence, weights)

    def _start_prefill(self, sequence: _Sequence, weights: AdapterWeights | None) -> None:
        if sequence.cancelled:
            self._retire(sequence)
            return
        adapter = sequence.request.adapter
        if adapter is not None:
            try:
                self._adapters.acquire(adapter, weights)
            except Exception as exc:
                self._fail(sequence, GenerationError(f"could not load adapter {adapter.adapter_id}: {exc}"))
                return
            sequence.holds_adapter = True
        params = sequence.request.params
        if params.repetition_penalty is not None and params.repetition_penalty != 1.0:
            vocabulary = self._adapters.model.config.vocab_size
            sequence.seen = torch.zeros(vocabulary, dtype=torch.bool, device=self._device)
            sequence.seen[sequence.request.prompt_ids] = True
        self._prefilling.append(sequence)

    def _prefill_step(self) -> None:
        """Prefill up to ``prefill_chunk`` prompt tokens of the newcomers, oldest first.

        Newcomers whose whole prompt fits what is left of the budget are prefilled together, in
        one left-padded forward that reads the weights once for all of them; a prompt longer than
        that, or one that asks for every position's logits, gets a chunk on its own cache.
        """
        budget = self._prefill_chunk
        together, alone = [], []
        for sequence in list(self._prefilling):
            if budget <= 0:
                break
            if sequence.cancelled:
                self._retire(sequence)
                continue
            remaining = len(sequence.request.prompt_ids) - sequence.length
            whole = sequence.length == 0 and remaining <= budget and not sequence.request.params.prefill_logprobs
            (together if whole else alone).append((sequence, min(remaining, budget)))
            budget -= min(remaining, budget)
        if len(together) > 1:
            self._prefill_together([sequence for sequence, _ in together])
        else:
            alone = together + alone
        for sequence, size in alone:
            prompt_ids = sequence.request.prompt_ids
            start = sequence.length
            chunk = prompt_ids[start : start + size]
            try:
                logits = self._prefill_chunk_forward(sequence, chunk)
            except Exception as exc:
                self._prefill_failed([sequence], exc)
                continue
            if start + len(chunk) < len(prompt_ids):
                continue
            if sequence.request.params.prefill_logprobs:
                sequence.prefill = self.text.prefill_tokens(prompt_ids, sequence.prefill_scores)
            self._prefilled([sequence], logits[-1:], sequence.cache)

    def _prefill_together(self, group: list[_Sequence]) -> None:
        """Whole prompts of ``group`` in one forward, right-aligned on a shared cache as the batch cache keeps them."""
        lengths = [len(s.request.prompt_ids) for s in group]
        columns = max(lengths)
        pad = self._config.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (columns - n) + s.request.prompt_ids for s, n in zip(group, lengths)], device=self._device)
        mask = torch.tensor([[0] * (columns - n) + [1] * n for n in lengths], device=self._device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = self._cache.new_prefill_cache()
        self._adapters.bind([s.adapter_id for s in group])
        try:
            with torch.inference_mode():
                output = self._adapters.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    cache_position=torch.arange(columns, device=self._device),
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        except Exception as exc:
            self._prefill_failed(group, exc)
            return
        for sequence, n in zip(group, lengths):
            sequence.length = n
        self._prefilled(group, output.logits[:, -1].float(), cache, mask)

    def _prefilled(self, group: list[_Sequence], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor | None = None) -> None:
        """Stream each sequence's first token from its row of ``logits``; the unfinished join the batch with their cache rows."""
        for sequence in group:
            self._prefilling.remove(sequence)
            sequence.cache = None
        try:
            self._emit(group, logits)
        except Exception as exc:
            self._prefill_failed(group, exc)
            return
        going = [row for row, s in enumerate(group) if not s.done]
        if not going:
            return
        if len(going) < len(group):
            index = torch.tensor(going, device=self._device)
            cache, mask = take_rows(cache, index), None if mask is None else mask.index_select(0, index)
        self._cache.add(cache, mask)
        self._batch.extend(group[row] for row in going)

    def _prefill_failed(self, group: list[_Sequence], exc: Exception) -> None:
        log.exception("prefill failed")
        for sequence in group:
            if not sequence.done:
                self._fail(sequence, exc if isinstance(exc, ServingError) else GenerationError(f"generation failed: {exc}"))

    def _prefill_chunk_forward(self, sequence: _Sequence, chunk: list[int]) -> torch.Tensor:
        """Run one prompt chunk on the sequence's own cache (made at its first chunk); its logits ``[n or 1, vocab]``."""
        start = sequence.length
        if sequence.cache is None:
            sequence.cache = self._cache.new_prefill_cache()
        all_logits = sequence.request.params.prefill_logprobs
        positions = torch.arange(start, start + len(chunk), device=self._device)
        self._adapters.bind([sequence.adapter_id])
        with torch.inference_mode():
            output = self._adapters.model(
                input_ids=torch.tensor([chunk], device=self._device),
                attention_mask=torch.ones(1, start + len(chunk), dtype=torch.long, device=self._device),
                position_ids=positions.unsqueeze(0),
                cache_position=positions,
                past_key_values=sequence.cache,
                use_cache=True,
                # logits for the last position only, as HF generate computes them, unless all are wanted
                logits_to_keep=0 if all_logits else 1,
            )
        sequence.length += len(chunk)
        logits = output.logits[0].float()
        if all_logits:
            sequence.prefill_scores.extend(self._prompt_scores(sequence.request.prompt_ids, start, logits))
        return logits

    @staticmethod
    def _prompt_scores(prompt_ids: list[int], start: int, logits: torch.Tensor) -> list[float | None]:
        """Log-probabilities of prompt tokens ``start .. start + n - 1`` (None for the first one)."""
        targets = prompt_ids[start + 1 : start + 1 + logits.shape[0]]
        log_probs = torch.log_softmax(logits[: len(targets)], dim=-1)
        scores = log_probs.gather(-1, torch.tensor(targets, device=logits.device).unsqueeze(-1)).squeeze(-1).tolist()
        return ([None] if start == 0 else []) + scores

    def _decode_step(self) -> None:
        """One token for every sequence in the batch, in one forward."""
        self._drop_finished()
        batch = list(self._batch)
        if not batch:
            return
        mask = self._cache.grow()
        columns = mask.shape[1]
        self._adapters.bind([s.adapter_id for s in batch])
        try:
            with torch.inference_mode():
                output = self._adapters.model(
                    input_ids=torch.tensor([[s.stream.ids[-1]] for s in batch], device=self._device),
                    attention_mask=mask,
                    position_ids=torch.tensor([[s.length] for s in batch], device=self._device),
                    cache_position=torch.arange(columns - 1, columns, device=self._device),
                    past_key_values=self._cache.cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        except Exception as exc:
            log.exception("decode failed")
            for sequence in batch:
                self._fail(sequence, GenerationError(f"generation failed: {exc}"))
            self._drop_finished()
            return
        for sequence in batch:
            sequence.length += 1
        try:
            self._emit(batch, output.logits[:, -1])
        except Exception as exc:
            log.exception("sampling failed")
            for sequence in batch:
                if not sequence.done:
                    self._fail(sequence, GenerationError(f"generation failed: {exc}"))
        self._drop_finished()

    def _drop_finished(self) -> None:
        """Take retired and cancelled sequences out of the batch and free their cache rows."""
        for sequence in self._batch:
            if sequence.cancelled and not sequence.done:
                self._retire(sequence)
        if any(s.done for s in self._batch):
            self._cache.keep([row for row, s in enumerate(self._batch) if not s.done])
            self._batch = [s for s in self._batch if not s.done]

    def _emit(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        """Choose each sequence's next token from its row of ``logits [rows, vocab]`` and stream it.

        Plain greedy rows are chosen together in one pass over the vocabulary; the others one
        by one through their processors, grammar and generator.
        """
        chosen: dict[int, tuple[int, float, list[tuple[int, float]]]] = {}
        greedy = [row for row, s in enumerate(sequences) if s.matcher is None and is_plain_greedy(s.request.params)]
        if greedy:
            rows = logits if len(greedy) == len(sequences) else logits[greedy]
            for row, token_id, logprob in zip(greedy, *choose_greedy(rows)):
                chosen[row] = token_id, logprob, []
        for row, sequence in enumerate(sequences):
            try:
                token_id, logprob, ranked = chosen[row] if row in chosen else self._choose(sequence, logits[row])
                self._push(sequence, token_id, logprob, ranked)
            except Exception as exc:
                log.exception("sampling failed")
                self._fail(sequence, GenerationError(f"generation failed: {exc}"))

    @staticmethod
    def _choose(sequence: _Sequence, logits: torch.Tensor) -> tuple[int, float, list[tuple[int, float]]]:
        """One sequence's next token through its processors and grammar (``logits`` is its row)."""
        params = sequence.request.params
        logits = logits.float()
        if sequence.matcher is not None:
            sequence.matcher.mask(logits)
        token_id, logprob, ranked = choose_token_with_alternatives(
            logits, params, sequence.seen, sequence.generator, params.alternatives or 0
        )
        if sequence.matcher is not None:
            sequence.matcher.accept(token_id)
        return token_id, logprob, ranked

    def _push(self, sequence: _Sequence, token_id: int, logprob: float, ranked: list[tuple[int, float]]) -> None:
        """Stream a chosen token, and finish the sequence when a stop condition holds."""
        params = sequence.request.params
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

    def _fail(self, sequence: _Sequence, error: ServingError) -> None:
        sequence.send(error)
        self._retire(sequence)

    def _retire(self, sequence: _Sequence) -> None:
        """Forget a finished, failed or cancelled sequence and unpin its adapter (its batch row goes next step)."""
        if sequence.done:
            return
        sequence.done = True
        if sequence in self._prefilling:
            self._prefilling.remove(sequence)
        if sequence.holds_adapter:
            sequence.holds_adapter = False
            self._adapters.release(sequence.adapter_id)
        sequence.cache = None
        with self._cond:
            self._depth -= 1

    def _abandon_all(self) -> None:
        with self._cond:
            waiting = self._waiting.clear()
            commands = list(self._commands)
            self._commands.clear()
        for sequence in waiting + self._loading + self._prefilling + self._batch:
            if not sequence.done:
                self._fail(sequence, IncompleteGenerationError("the engine stopped before the generation finished"))
        self._loading, self._prefilling, self._batch = [], [], []
        self._cache.keep([])
        for _, future in commands:
            if future.set_running_or_notify_cancel():
                future.set_exception(IncompleteGenerationError("the engine stopped"))
