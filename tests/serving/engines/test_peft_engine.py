"""The PEFT baseline engine: greedy parity with the torch engine over HTTP, refusals, and the Engine contract."""

from __future__ import annotations

import asyncio
from contextlib import contextmanager

import httpx
import pytest

from serving.engines.base import GenerationRequest, SamplingParams, TokenEvent
from serving.engines.peft_engine import PeftEngine
from serving.errors import GenerationError, IncompleteGenerationError, OverloadedError
from serving.registry import Registry
from serving.server import create_app
from serving.service import ServerSettings, ServeSettings, build_service
from tests.lora_factory import make_lora_adapter
from tests.serving.engines.test_torch_engine import collect, wait_until
from tests.serving.server_harness import serving_in_thread

PROMPTS = [
    "Review: Lovely view and kind hosts.\nSentiment:",
    "The capital of France is",
    "Ünïcödé — café, naïve 😀 𓀀 and",
    "Once",
]
ADAPTERS = ("alpha", "beta", "gamma")
# every row of one concurrent wave: base and three adapters, prompts and lengths mixed
MIXED = [(PROMPTS[i % len(PROMPTS)], [None, *ADAPTERS][i % 4], 6 + i) for i in range(10)]


@pytest.fixture(scope="module")
def registry_dir(tiny_base_dir, tmp_path_factory):
    """Three registered adapters with non-zero weights: ranks 8, 16, 8."""
    root = tmp_path_factory.mktemp("peft-engine")
    registry = Registry(root / "registry")
    for seed, (name, r) in enumerate(zip(ADAPTERS, (8, 16, 8)), start=1):
        registry.add(make_lora_adapter(tiny_base_dir, root / name, r=r, alpha=2 * r, seed=seed, scale=0.2), name, base_dir=tiny_base_dir)
    return root / "registry"


@contextmanager
def served(engine: str, registry_dir, max_active_adapters: int = 4):
    """`stillhouse serve --engine ENGINE --dtype float32` on the tiny base, on a loopback port."""
    settings = ServeSettings(
        base="tiny", registry=registry_dir, engine=engine, dtype="float32", max_active_adapters=max_active_adapters,
        server=ServerSettings(profile="lorax"),
    )  # fmt: skip
    with serving_in_thread(create_app(build_service(settings))) as url:
        yield url


async def mixed_wave(url: str) -> list[tuple[str, str, list[int]]]:
    """The MIXED requests all at once over LoRAX /generate; (text, finish reason, token ids) of each."""

    async def one(client, prompt, adapter, max_new_tokens):
        parameters = {"max_new_tokens": max_new_tokens, "details": True}
        if adapter:
            parameters["adapter_id"] = adapter
        response = await client.post(f"{url}/generate", json={"inputs": prompt, "parameters": parameters})
        assert response.status_code == 200, response.text
        body = response.json()
        return body["generated_text"], body["details"]["finish_reason"], [t["id"] for t in body["details"]["tokens"]]

    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(one(client, *row) for row in MIXED))


def test_greedy_through_the_peft_engine_equals_the_torch_engine(registry_dir):
    outputs = {}
    for engine in ("torch", "peft"):
        with served(engine, registry_dir) as url:
            outputs[engine] = asyncio.run(mixed_wave(url))
    assert outputs["peft"] == outputs["torch"]
    assert len({tuple(ids) for _, _, ids in outputs["peft"]}) > len(PROMPTS)  # the adapters change the outputs


def test_fewer_slots_than_adapters_evict_and_still_match(registry_dir):
    with served("torch", registry_dir) as url:
        expected = asyncio.run(mixed_wave(url))
    with served("peft", registry_dir, max_active_adapters=1) as url:
        assert asyncio.run(mixed_wave(url)) == expected


@pytest.mark.parametrize(
    "parameters, field",
    [
        ({"repetition_penalty": 1.3}, "repetition_penalty"),
        ({"typical_p": 0.5}, "typical_p"),
        ({"decoder_input_details": True}, "decoder_input_details"),
        ({"return_k_alternatives": 2}, "return_k_alternatives"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_unsupported_features_are_refused_naming_the_field(registry_dir, parameters, field):
    with served("peft", registry_dir) as url:
        response = httpx.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2, **parameters}}, timeout=60)
    assert response.status_code == 422, response.text
    assert response.json()["error_type"] == "validation" and field in response.json()["error"]
    assert "--engine torch" in response.json()["error"]


@pytest.fixture
def engine(tiny_base_dir):
    engine = PeftEngine(tiny_base_dir, "tiny", max_queue=2)
    yield engine
    asyncio.run(engine.stop())


def test_sampling_is_reproducible_by_seed(engine):
    async def scenario():
        await engine.start()
        ids = engine.tokenize(PROMPTS[0])
        params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=40, top_p=0.9, seed=7)
        first, second = await collect(engine, ids, params), await collect(engine, ids, params)
        assert [t.id for t in first[0]] == [t.id for t in second[0]] and first[1].seed == 7
        unseeded = await collect(engine, ids, SamplingParams(max_new_tokens=4, do_sample=True))
        assert unseeded[1].seed is not None

    asyncio.run(scenario())


def test_full_queue_overloads_and_closed_streams_are_dropped(engine):
    async def scenario():
        await engine.start()
        ids = engine.tokenize(PROMPTS[0])
        endless = SamplingParams(max_new_tokens=2000, ignore_eos_token=True)
        running = engine.generate(GenerationRequest(ids, endless))
        assert isinstance(await running.__anext__(), TokenEvent)
        waiting = engine.generate(GenerationRequest(ids, endless))
        next_of_waiting = asyncio.ensure_future(waiting.__anext__())  # waits for the running batch to end
        await wait_until(lambda: engine.queue_depth() == 2)
        with pytest.raises(OverloadedError):
            await engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=2))).__anext__()
        await running.aclose()  # the client went away: its batch ends at the next token
        assert isinstance(await next_of_waiting, TokenEvent)
        await waiting.aclose()
        await wait_until(lambda: engine.queue_depth() == 0)
        _, result = await collect(engine, ids, SamplingParams(max_new_tokens=2, ignore_eos_token=True))
        assert result.generated_tokens == 2 and result.finish_reason == "length"

    asyncio.run(scenario())


def test_stop_fails_running_and_waiting_requests(engine):
    async def scenario():
        await engine.start()
        ids = engine.tokenize(PROMPTS[0])
        running = engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=2000, ignore_eos_token=True)))
        await running.__anext__()
        waiting = asyncio.ensure_future(collect(engine, ids, SamplingParams(max_new_tokens=4)))
        await wait_until(lambda: engine.queue_depth() == 2)
        await engine.stop()
        with pytest.raises(IncompleteGenerationError):
            async for _ in running:
                pass
        with pytest.raises(IncompleteGenerationError):
            await waiting
        with pytest.raises(GenerationError):
            await engine.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=2))).__anext__()

    asyncio.run(scenario())
