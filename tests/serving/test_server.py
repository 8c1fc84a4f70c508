"""The inference server against the real lorax-client and openai clients, over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import lorax
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.engines.torch_engine import TorchEngine
from serving.registry import Registry
from serving.service import ServerSettings, Service
from tests.lora_factory import make_lora_adapter
from tests.serving.server_harness import running_server

ADMIN = "s3cret"
PROMPTS = ["Review: Lovely view and kind hosts.\nSentiment:", "The capital of France is"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base_dir):
    """Two registered adapters (r=8 and r=16) plus their source directories."""
    root = tmp_path_factory.mktemp("adapters")
    registry_dir = root / "registry"
    registry = Registry(registry_dir)
    sources = {}
    for name, r, seed in [("alpha", 8, 1), ("beta", 16, 2)]:
        sources[name] = make_lora_adapter(tiny_base_dir, root / name, r=r, alpha=2 * r, seed=seed, scale=0.2)
        registry.add(sources[name], name, base_dir=tiny_base_dir)
    return registry_dir, sources


@pytest.fixture(scope="module")
def server(tiny_base_dir, adapters):
    registry_dir, _ = adapters
    with running_server(tiny_base_dir, registry_dir, admin_token=ADMIN) as (url, service):
        yield url, service


def peft_greedy(base_dir, adapter_dir, prompt: str, max_new_tokens: int) -> list[int]:
    """Reference ids from peft's own generate (or plain transformers for the base)."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


# --- LoRAX protocol with the real lorax-client ----------------------------------------------


@pytest.mark.parametrize("adapter", [None, "alpha", "beta@v1"])
def test_lorax_client_greedy_matches_peft(server, adapters, tiny_base_dir, adapter):
    url, _ = server
    _, sources = adapters
    source = sources[adapter.split("@")[0]] if adapter else None
    client = lorax.Client(url)
    for prompt in PROMPTS:
        response = client.generate(prompt, adapter_id=adapter, max_new_tokens=10)
        ids = [token.id for token in response.details.tokens]
        assert ids == peft_greedy(tiny_base_dir, source, prompt, 10)
        assert response.details.generated_tokens == len(ids)
        assert all(isinstance(token.logprob, float) for token in response.details.tokens)


def test_adapters_change_the_output(server):
    url, _ = server
    client = lorax.Client(url)
    outputs = {a: client.generate(PROMPTS[0], adapter_id=a, max_new_tokens=8).generated_text for a in (None, "alpha", "beta")}
    assert len(set(outputs.values())) == 3


def test_lorax_stream_concatenates_to_the_final_text(server):
    url, _ = server
    client = lorax.Client(url)
    events = list(client.generate_stream(PROMPTS[1], adapter_id="alpha", max_new_tokens=12))
    final = client.generate(PROMPTS[1], adapter_id="alpha", max_new_tokens=12)
    assert events[-1].generated_text == final.generated_text
    assert all(event.generated_text is None for event in events[:-1])
    assert "".join(e.token.text for e in events if not e.token.special) == final.generated_text
    assert events[-1].details.generated_tokens == len(events)


def test_lorax_async_client(server):
    url, _ = server

    async def run():
        client = lorax.AsyncClient(url)
        responses = await asyncio.gather(*(client.generate(p, adapter_id=a, max_new_tokens=6) for p in PROMPTS for a in ("alpha", "beta")))
        streamed = [event async for event in client.generate_stream(PROMPTS[0], adapter_id="beta", max_new_tokens=6)]
        return responses, streamed

    responses, streamed = asyncio.run(run())
    sync = lorax.Client(url)
    for response, (prompt, adapter) in zip(responses, [(p, a) for p in PROMPTS for a in ("alpha", "beta")]):
        assert response.generated_text == sync.generate(prompt, adapter_id=adapter, max_new_tokens=6).generated_text
    assert streamed[-1].details.finish_reason.value in ("length", "eos_token")


def test_stop_sequences_seed_and_full_text(server):
    url, _ = server
    client = lorax.Client(url)
    plain = client.generate(PROMPTS[0], adapter_id="alpha", max_new_tokens=12, ignore_eos_token=True).generated_text
    stop = plain[3:6]
    stopped = client.generate(PROMPTS[0], adapter_id="alpha", max_new_tokens=12, stop_sequences=[stop], ignore_eos_token=True)
    assert stopped.details.finish_reason.value == "stop_sequence"
    # As in LoRAX, the text runs to the end of the token that completed the stop sequence.
    assert stop in stopped.generated_text and plain.startswith(stopped.generated_text)

    sampled = [client.generate(PROMPTS[1], do_sample=True, temperature=1.5, seed=7, max_new_tokens=10) for _ in range(2)]
    assert sampled[0].generated_text == sampled[1].generated_text
    assert sampled[0].details.seed == 7

    full = client.generate(PROMPTS[1], max_new_tokens=4, return_full_text=True)
    assert full.generated_text.startswith(PROMPTS[1])


def test_decoder_input_details(server):
    url, _ = server
    response = lorax.Client(url).generate(PROMPTS[1], max_new_tokens=2, decoder_input_details=True)
    prefill = response.details.prefill
    assert len(prefill) == response.details.prompt_tokens
    assert prefill[0].logprob is None and all(t.logprob <= 0 for t in prefill[1:])


def test_lorax_errors_map_to_client_exceptions(server):
    url, _ = server
    client = lorax.Client(url)
    with pytest.raises(lorax.errors.GenerationError, match="nope"):
        client.generate("hi", adapter_id="nope", max_new_tokens=2)
    with pytest.raises(lorax.errors.ValidationError, match="max_new_tokens"):
        client.generate("hi", max_new_tokens=10**6)
    with pytest.raises(lorax.errors.ValidationError):
        client.generate("hi", adapter_id="../../etc/passwd", max_new_tokens=2)
    with pytest.raises(lorax.errors.ValidationError, match="stop"):
        client.generate("hi", max_new_tokens=2, stop_sequences=list("abcde"))


def test_overload_is_429(tiny_base_dir, adapters):
    registry_dir, _ = adapters
    with running_server(tiny_base_dir, registry_dir, max_queue=1) as (url, service):
        client = lorax.Client(url)
        long_answer: list = []
        worker = threading.Thread(
            target=lambda: long_answer.append(client.generate("x", max_new_tokens=200, ignore_eos_token=True))
        )
        worker.start()
        deadline = time.monotonic() + 30
        while service.engine.queue_depth() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(lorax.errors.OverloadedError, match="queue is full"):
            client.generate("y", max_new_tokens=1)
        worker.join()
        assert long_answer[0].details.generated_tokens == 200  # the running request is unaffected
        assert 'outcome="overloaded"' in httpx.get(f"{url}/metrics").text


def test_non_servable_registry_entry_is_refused(server, adapters, tiny_base_dir, tmp_path):
    url, _ = server
    registry_dir, _ = adapters
    odd = make_lora_adapter(tiny_base_dir, tmp_path / "odd", r=12, alpha=12)
    Registry(registry_dir).add(odd, "odd-rank", base_dir=tiny_base_dir, profile="lorax")
    with pytest.raises(lorax.errors.GenerationError, match="not servable"):
        lorax.Client(url).generate("hi", adapter_id="odd-rank", max_new_tokens=2)


# --- raw HTTP, as curl sends it -------------------------------------------------------------


def test_raw_lorax_routes_and_headers(server):
    url, _ = server
    body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 3, "adapter_id": "alpha"}}
    listed = httpx.post(f"{url}/", json=body)
    single = httpx.post(f"{url}/generate", json=body)
    assert listed.status_code == 200 and isinstance(listed.json(), list)
    assert listed.json()[0]["generated_text"] == single.json()["generated_text"]
    assert single.headers["x-adapter-id"] == "alpha@v1"
    assert int(single.headers["x-generated-tokens"]) == single.json()["details"]["generated_tokens"]
    for header in ("x-prompt-tokens", "x-total-time", "x-time-to-first-token"):
        assert int(single.headers[header]) >= 0

    with httpx.stream("POST", f"{url}/generate_stream", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    events = [json.loads(line[5:]) for line in lines]
    assert events[-1]["generated_text"] == single.json()["generated_text"]
    assert "[DONE]" not in lines[-1]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"inputs": "", "parameters": {}}, "inputs"),
        ({"inputs": "x", "parameters": {"temperature": -1}}, "temperature"),
        ({"inputs": "x", "parameters": {"top_p": 1.5}}, "top_p"),
        ({"inputs": "x", "parameters": {"top_k": 0}}, "top_k"),
        ({"inputs": "x", "parameters": {"typical_p": 1.0}}, "typical_p"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"inputs": "x", "parameters": {"best_of": 2}}, "best_of"),
        ({"inputs": "x", "parameters": {"tempreature": 1}}, "tempreature"),
        ({"inputs": 5}, "inputs"),
        ({"parameters": {}}, "inputs"),
    ],
)
def test_invalid_requests_are_422_with_the_field(server, body, field):
    url, _ = server
    response = httpx.post(f"{url}/generate", json=body)
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"
    assert field in response.json()["error"]


def test_malformed_json_is_422(server):
    url, _ = server
    response = httpx.post(f"{url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error_type"] == "validation"


def test_health_info_models(server):
    url, _ = server
    assert httpx.get(f"{url}/health").status_code == 200
    info = httpx.get(f"{url}/info").json()
    assert info["model_id"] == "tiny" and info["servability_profile"] == "strict"
    ids = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert {"tiny", "alpha", "alpha@v1", "beta", "beta@v1"} <= ids


# --- OpenAI protocol with the real openai client ------------------------------------------------


def test_openai_completions_and_chat(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    lorax_text = lorax.Client(url).generate(PROMPTS[1], adapter_id="alpha", max_new_tokens=6).generated_text

    completion = client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert completion.choices[0].text == lorax_text
    assert completion.usage.completion_tokens == 6 or completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    chunks = list(client.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == lorax_text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")

    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(model="beta", messages=messages, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    streamed = list(
        client.chat.completions.create(
            model="beta", messages=messages, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content
    assert streamed[-1].usage.completion_tokens == chat.usage.completion_tokens

    base = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4, temperature=0)
    assert base.choices[0].text == lorax.Client(url).generate(PROMPTS[1], max_new_tokens=4).generated_text


def test_openai_stop_is_excluded_and_errors_raise(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    plain = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"ignore_eos_token": True})
    stop = plain.choices[0].text[4:7]
    stopped = client.completions.create(
        model="alpha", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos_token": True}
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert plain.choices[0].text.startswith(stopped.choices[0].text + stop)
    assert stop not in stopped.choices[0].text
    streamed = client.completions.create(
        model="alpha", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop], stream=True, extra_body={"ignore_eos_token": True}
    )
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text

    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="alpha", prompt="x", max_tokens=2, n=3)
    with pytest.raises(openai.APIStatusError) as caught:
        client.completions.create(model="missing", prompt="x", max_tokens=2)
    assert caught.value.status_code == 424


def test_openai_checks_the_stop_sequence_limit(server):
    url, service = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    too_many = [str(i) for i in range(service.settings.max_stop_sequences + 1)]
    calls = [
        lambda: client.completions.create(model="alpha", prompt="x", max_tokens=2, stop=too_many),
        lambda: client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=2, stop=too_many),
    ]
    for call in calls:
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            call()
        assert caught.value.response.json() == {"error": "`stop` supports up to 4 stop sequences. Given: 5", "error_type": "validation"}


# --- admin API ------------------------------------------------------------------------------


def test_admin_requires_the_token(server):
    url, _ = server
    assert httpx.get(f"{url}/admin/adapters").status_code == 401
    assert httpx.get(f"{url}/admin/adapters", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "alpha"}).status_code == 401
    assert httpx.post(f"{url}/admin/adapters/unload", json={"adapter_id": "alpha"}, headers={"Authorization": "Bearer x"}).status_code == 403


def test_admin_load_unload_and_vllm_endpoints(server, tiny_base_dir, tmp_path):
    url, _ = server
    auth = {"Authorization": f"Bearer {ADMIN}"}
    loaded = httpx.post(f"{url}/admin/adapters/load", json={"adapter_id": "beta"}, headers=auth)
    assert loaded.status_code == 200 and loaded.json()["adapter_id"] == "beta@v1"
    assert "beta@v1" in httpx.get(f"{url}/admin/adapters", headers=auth).json()["resident"]
    assert httpx.post(f"{url}/admin/adapters/unload", json={"adapter_id": "beta"}, headers=auth).json()["unloaded"]
    assert "beta@v1" not in httpx.get(f"{url}/admin/adapters", headers=auth).json()["resident"]

    fresh = make_lora_adapter(tiny_base_dir, tmp_path / "gamma", r=8, seed=3)
    response = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(fresh)}, headers=auth)
    assert response.status_code == 200 and "gamma" in response.text
    assert lorax.Client(url).generate("hi", adapter_id="gamma", max_new_tokens=2).generated_text is not None
    bad = make_lora_adapter(tiny_base_dir, tmp_path / "dora", r=8, use_dora=True)
    refused = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "dora", "lora_path": str(bad)}, headers=auth)
    assert refused.status_code == 400 and "dora" in refused.text.lower()
    assert refused.json()["error_type"] == "generation"
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "gamma"}, headers=auth).status_code == 200
    again = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "gamma"}, headers=auth)
    assert again.status_code == 404
    assert again.json() == {"error": "adapter gamma is not loaded", "error_type": "not_found"}


def test_every_refusal_has_the_lorax_error_shape(server):
    url, _ = server
    auth = {"Authorization": f"Bearer {ADMIN}"}
    httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "beta"}, headers=auth)
    refusals = [
        (401, "unauthorized", httpx.get(f"{url}/admin/adapters")),
        (403, "forbidden", httpx.get(f"{url}/admin/adapters", headers={"Authorization": "Bearer wrong"})),
        (404, "not_found", httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "beta"}, headers=auth)),
        (422, "validation", httpx.post(f"{url}/generate", json={"inputs": ""})),
        (422, "validation", httpx.post(f"{url}/v1/completions", json={"prompt": "x", "stop": list("abcde")})),
        (424, "generation", httpx.post(f"{url}/generate", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})),
        (424, "generation", httpx.post(f"{url}/generate_stream", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})),
    ]
    for status, error_type, response in refusals:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error", "error_type"} and body["error_type"] == error_type and body["error"]


# --- metrics --------------------------------------------------------------------------------


def test_per_adapter_metrics(server):
    url, _ = server
    client = lorax.Client(url)
    client.generate("hello", adapter_id="alpha", max_new_tokens=3)
    with pytest.raises(lorax.errors.GenerationError):
        client.generate("hello", adapter_id="nope", max_new_tokens=3)
    text = httpx.get(f"{url}/metrics").text
    assert 'stillhouse_server_requests_total{adapter="alpha@v1",outcome="success"}' in text
    assert 'stillhouse_server_requests_total{adapter="__unknown__",outcome="not_found"}' in text
    assert 'stillhouse_server_time_to_first_token_seconds_count{adapter="alpha@v1"}' in text
    assert 'stillhouse_server_generated_tokens_total{adapter="alpha@v1"}' in text
    assert "stillhouse_server_queue_depth" in text and "stillhouse_server_resident_adapters" in text
    assert 'stillhouse_server_adapter_load_seconds_count{adapter="alpha@v1"}' in text
    assert "nope" not in text  # unknown ids never become label values


def test_a_pinned_adapter_stays_in_its_slot_and_cannot_be_unloaded(tiny_base_dir, adapters):
    registry_dir, _ = adapters
    with running_server(tiny_base_dir, registry_dir, admin_token=ADMIN, max_active_adapters=1, pinned_adapters=("alpha",)) as (url, service):
        assert service.engine.resident_adapters() == ["alpha@v1"]  # loaded at start-up
        client = lorax.Client(url)
        for _ in range(2):
            client.generate("hello", adapter_id="beta", max_new_tokens=2)  # one slot: beta goes when idle, alpha stays
        assert "alpha@v1" in service.engine.resident_adapters()
        text = httpx.get(f"{url}/metrics").text
        assert 'stillhouse_server_adapter_evictions_total{adapter="alpha@v1"} 0.0' in text
        assert 'stillhouse_server_adapter_load_seconds_count{adapter="alpha@v1"} 1.0' in text  # the start-up load
        auth = {"Authorization": f"Bearer {ADMIN}"}
        refused = httpx.post(f"{url}/admin/adapters/unload", json={"adapter_id": "alpha"}, headers=auth)
        assert refused.status_code == 409 and "--pin-adapter" in refused.json()["error"]
        assert client.generate("hello", adapter_id="alpha", max_new_tokens=2).generated_text is not None


def test_pinning_an_unknown_adapter_or_the_base_names_the_flag(tiny_base_dir, adapters):
    registry_dir, _ = adapters
    engine = TorchEngine(tiny_base_dir, "tiny")
    service = Service(engine=engine, registry=Registry(registry_dir), base_dir=tiny_base_dir,
                      settings=ServerSettings(pinned_adapters=("ghost", "tiny", "alpha")))
    problems = service.pin_problems()
    assert len(problems) == 2
    assert problems[0].startswith("--pin-adapter ghost:") and "base model" in problems[1]


def test_lru_evictions_are_counted_and_unloads_are_not(tiny_base_dir, adapters):
    registry_dir, _ = adapters
    with running_server(tiny_base_dir, registry_dir, admin_token=ADMIN, max_active_adapters=1) as (url, _):
        client = lorax.Client(url)
        client.generate("hello", adapter_id="alpha", max_new_tokens=2)
        client.generate("hello", adapter_id="beta", max_new_tokens=2)  # only one fits: alpha is evicted
        text = httpx.get(f"{url}/metrics").text
        assert 'stillhouse_server_adapter_evictions_total{adapter="alpha@v1"} 1.0' in text
        assert 'stillhouse_server_adapter_evictions_total{adapter="beta@v1"} 0.0' in text
        auth = {"Authorization": f"Bearer {ADMIN}"}
        assert httpx.post(f"{url}/admin/adapters/unload", json={"adapter_id": "beta"}, headers=auth).status_code == 200
        assert 'stillhouse_server_adapter_evictions_total{adapter="beta@v1"} 0.0' in httpx.get(f"{url}/metrics").text
