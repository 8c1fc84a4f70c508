"""What a hostile or careless client sends, over real HTTP: each answer is a 4xx naming the field, in the LoRAX shape.

No input may make the server answer 5xx, stream invalid JSON, leak an engine's internal error
text or a filesystem path, or stall ``/health``.
"""

from __future__ import annotations

import json
import shutil
import threading

import httpx
import pytest

from serving.registry import Registry
from tests.lora_factory import make_lora_adapter
from tests.serving.server_harness import running_server

ADMIN = "hostile-token"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
JSON = {"content-type": "application/json"}
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory, tiny_base_dir):
    root = tmp_path_factory.mktemp("hostile")
    Registry(root / "registry").add(make_lora_adapter(tiny_base_dir, root / "alpha", r=8, seed=1), "alpha", base_dir=tiny_base_dir)
    return root / "registry"


@pytest.fixture(scope="module")
def server(tiny_base_dir, registry_dir):
    with running_server(tiny_base_dir, registry_dir, admin_token=ADMIN, default_max_new_tokens=4, max_body_bytes=MAX_BODY) as (url, _):
        yield url


def assert_refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error"], body
    for word in words:
        assert word in body["error"], body


def post_raw(url: str, text: str, **headers) -> httpx.Response:
    """POST ``text`` as the body exactly (a JSON ``\\ud800`` escape stays an escape)."""
    return httpx.post(url, content=text.encode(), headers={**JSON, **headers}, timeout=60)


SEED = 2**64  # one past LoRAX's u64
SEED_CASES = [
    ("/generate", {"inputs": "hi", "parameters": {"seed": SEED, "do_sample": True, "max_new_tokens": 2}}, "parameters.seed"),
    ("/v1/completions", {"prompt": "hi", "seed": SEED, "max_tokens": 2}, "seed"),  # OpenAI samples by default
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": SEED, "max_tokens": 2}, "seed"),
]


@pytest.mark.parametrize(("path", "body", "field"), SEED_CASES, ids=[c[0] for c in SEED_CASES])
def test_a_seed_past_64_bits_is_a_422_naming_it(server, path, body, field):
    assert_refused(httpx.post(f"{server}{path}", json=body, timeout=60), 422, field)


def test_the_largest_64_bit_seed_is_served_and_reported(server):
    body = {"inputs": "hi", "parameters": {"seed": SEED - 1, "do_sample": True, "max_new_tokens": 2}}
    response = httpx.post(f"{server}/generate", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["details"]["seed"] == SEED - 1


NEAR_ZERO = [
    ("/generate", {"inputs": "hi", "parameters": {"repetition_penalty": 1e-300, "max_new_tokens": 3}}, "parameters.repetition_penalty"),
    ("/generate_stream", {"inputs": "hi", "parameters": {"repetition_penalty": 1e-300, "max_new_tokens": 3}}, "parameters.repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 5e-324, "max_tokens": 2}, "repetition_penalty"),
    ("/generate", {"inputs": "hi", "parameters": {"temperature": 1e-300, "do_sample": True, "max_new_tokens": 3}}, "parameters.temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": 1e-300, "max_tokens": 2}, "temperature"),
]


@pytest.mark.parametrize(("path", "body", "field"), NEAR_ZERO, ids=[f"{c[0]} {c[2]}" for c in NEAR_ZERO])
def test_a_temperature_or_penalty_near_zero_is_a_422_not_nan(server, path, body, field):
    assert_refused(httpx.post(f"{server}{path}", json=body, timeout=60), 422, field)


def test_non_finite_numbers_are_refused(server):
    assert_refused(post_raw(f"{server}/generate", '{"inputs": "hi", "parameters": {"temperature": Infinity}}'), 422, "temperature")
    assert_refused(post_raw(f"{server}/v1/completions", '{"prompt": "hi", "top_p": NaN}'), 422, "top_p")


def test_streams_hold_only_strict_json(server):
    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in a stream event"))

    body = {"inputs": "hi", "parameters": {"repetition_penalty": 0.01, "max_new_tokens": 4, "decoder_input_details": True}}
    with httpx.stream("POST", f"{server}/generate_stream", json=body, timeout=60) as response:
        events = [strict(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert response.status_code == 200 and events[-1]["details"]["generated_tokens"] == 4


SURROGATES = [
    ("/generate", '{"inputs": "hi \\ud800"}', "inputs"),
    ("/generate", '{"inputs": "hi", "parameters": {"stop": ["\\udfff"]}}', "parameters.stop"),
    ("/v1/completions", '{"prompt": ["\\ud800"], "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
]


@pytest.mark.parametrize(("path", "text", "field"), SURROGATES, ids=[c[2] for c in SURROGATES])
def test_a_lone_surrogate_is_a_422_naming_the_field(server, path, text, field):
    assert_refused(post_raw(f"{server}{path}", text), 422, field, "surrogate")


def test_a_chat_the_template_refuses_is_a_422_naming_messages(server):
    body = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "max_tokens": 2}
    assert_refused(httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60), 422, "messages", "alternate")


def test_a_body_over_the_limit_is_a_413_declared_or_streamed(server):
    big = json.dumps({"inputs": "a" * MAX_BODY}).encode()
    assert_refused(httpx.post(f"{server}/generate", content=big, headers=JSON, timeout=60), 413, "--max-body-bytes")

    def chunks():  # no content-length: the limit holds for what actually arrives
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    assert_refused(httpx.post(f"{server}/generate", content=chunks(), headers=JSON, timeout=60), 413, "--max-body-bytes")
    assert httpx.post(f"{server}/generate", json={"inputs": "a" * 100, "parameters": {"max_new_tokens": 1}}, timeout=60).status_code == 200


def test_a_long_prompt_is_tokenized_off_the_event_loop(tiny_base_dir, registry_dir):
    prompt = "lorem ipsum dolor sit amet " * 100_000  # 2.7 MB: seconds of tokenization
    with running_server(tiny_base_dir, registry_dir, default_max_new_tokens=1, max_body_bytes=4 << 20) as (url, _):
        done = threading.Event()
        answers = []

        def send_long():
            answers.append(httpx.post(f"{url}/generate", json={"inputs": prompt}, timeout=300))
            done.set()

        sender = threading.Thread(target=send_long)
        sender.start()
        healthy_meanwhile = 0
        while not done.is_set():
            healthy_meanwhile += httpx.get(f"{url}/health", timeout=60).status_code == 200 and not done.is_set()
        sender.join()
    assert_refused(answers[0], 422, "inputs")  # longer than the model's context
    # A blocked loop answers /health only before tokenization starts or after it ends.
    assert healthy_meanwhile >= 5


def test_admin_routes_check_the_token_before_the_body(server):
    for path in ("/admin/adapters/load", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert_refused(httpx.post(f"{server}{path}", json={"wrong": 1}), 401, "admin token")
        assert_refused(httpx.post(f"{server}{path}", content=b"{not json", headers=JSON), 401, "admin token")
        assert_refused(httpx.post(f"{server}{path}", json={"wrong": 1}, headers={"Authorization": "Bearer nope"}), 403)
        assert_refused(httpx.post(f"{server}{path}", json={"wrong": 1}, headers=AUTH), 422, "wrong")


def test_framework_refusals_are_in_the_lorax_shape(server):
    assert_refused(httpx.post(f"{server}/generate", content=b"(\xfc\xfd", headers=JSON), 400)
    assert_refused(httpx.post(f"{server}/generate", content=b"{not json", headers=JSON), 422, "JSON")
    wrong_method = httpx.get(f"{server}/generate")
    assert_refused(wrong_method, 405, "POST")
    assert wrong_method.headers["allow"] == "POST"
    assert_refused(httpx.get(f"{server}/no-such-route"), 404, "/no-such-route")


def test_info_shows_the_registry_path_to_the_admin_only(server, registry_dir):
    assert "registry" not in httpx.get(f"{server}/info").json()
    assert "registry" not in httpx.get(f"{server}/info", headers={"Authorization": "Bearer nope"}).json()
    assert httpx.get(f"{server}/info", headers=AUTH).json()["registry"] == str(registry_dir)


def test_an_adapter_the_engine_cannot_load_answers_424_without_its_internals(tiny_base_dir, tmp_path):
    registry = Registry(tmp_path / "registry")
    entry = registry.add(make_lora_adapter(tiny_base_dir, tmp_path / "src", r=8), "broken", base_dir=tiny_base_dir)
    request = {"inputs": "hi", "parameters": {"adapter_id": "broken"}}
    with running_server(tiny_base_dir, registry.root, admin_token=ADMIN, default_max_new_tokens=1) as (url, _):
        assert httpx.post(f"{url}/generate", json=request, timeout=60).status_code == 200  # checked and loaded once
        assert httpx.post(f"{url}/admin/adapters/unload", json={"adapter_id": "broken"}, headers=AUTH).json()["unloaded"]
        weights = entry.path / "adapter_model.safetensors"  # damaged on disk afterwards: the next load fails
        weights.unlink()
        weights.mkdir()
        response = httpx.post(f"{url}/generate", json=request, timeout=60)
    assert_refused(response, 424, "server log")
    assert str(tmp_path) not in response.text and "Errno" not in response.text


def test_load_lora_adapter_refuses_a_link_out_of_the_adapter_directory(server, registry_dir, tiny_base_dir, tmp_path):
    source = make_lora_adapter(tiny_base_dir, tmp_path / "linked", r=8, seed=4)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the registry")
    (source / "README.md").unlink(missing_ok=True)
    (source / "README.md").symlink_to(secret)
    response = httpx.post(f"{server}/v1/load_lora_adapter", json={"lora_name": "linked", "lora_path": str(source)}, headers=AUTH, timeout=60)
    assert_refused(response, 400, "README.md", "symbolic link")
    assert not (registry_dir / "linked").exists()
    shutil.rmtree(source)
