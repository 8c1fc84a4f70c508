"""The real lorax-client and openai client through the router to the real inference server."""

from __future__ import annotations

import httpx
import lorax
import openai
import pytest
import yaml

from serving.registry import Registry
from serving.request_log import SQLiteStore
from tests.abtest.harness import running_router
from tests.lora_factory import make_lora_adapter
from tests.serving.server_harness import running_server

TEMPLATE = "Review: Lovely view.\nSentiment: positive\nReview: {{text}}\nSentiment:"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_base_dir):
    """The tiny server with adapter `student`, logging requests, and a router splitting `sentiment`."""
    root = tmp_path_factory.mktemp("stack")
    registry = Registry(root / "registry")
    registry.add(make_lora_adapter(tiny_base_dir, root / "student", r=8, alpha=16, seed=3, scale=0.2), "student", base_dir=tiny_base_dir)
    with running_server(tiny_base_dir, root / "registry", request_log=root / "server.db") as (server_url, _):
        config = {
            "version": 1, "salt": "exp", "sticky": {"header": "X-User-Id"}, "default_upstream": server_url,
            "routes": {"sentiment": {"mode": "template", "input": "text", "arms": {
                "teacher": {"role": "control", "upstream": server_url, "template": TEMPLATE, "weight": 1, "fallback": True},
                "student": {"role": "candidate", "upstream": server_url, "adapter": "student@v1", "template": "{{text}}", "weight": 1},
            }}},
        }
        (root / "traffic.yaml").write_text(yaml.safe_dump(config))
        with running_router(root / "traffic.yaml", request_log=root / "router.db") as (router_url, router):
            yield server_url, router_url, router, root


def direct(server_url: str, arm: str, text: str, max_new_tokens: int = 6) -> str:
    """What the server answers for an arm when called without the router."""
    prompt, adapter = (TEMPLATE.replace("{{text}}", text), None) if arm == "teacher" else (text, "student@v1")
    return lorax.Client(server_url).generate(prompt, adapter_id=adapter, max_new_tokens=max_new_tokens).generated_text


@pytest.mark.parametrize("arm", ["teacher", "student"])
def test_lorax_client_through_the_router(stack, arm):
    server_url, router_url, _, _ = stack
    client = lorax.Client(router_url, headers={"x-stillhouse-arm": arm})
    expected = direct(server_url, arm, "Great food.")
    assert client.generate("Great food.", adapter_id="sentiment", max_new_tokens=6).generated_text == expected
    streamed = [r for r in client.generate_stream("Great food.", adapter_id="sentiment", max_new_tokens=6)]
    assert streamed[-1].generated_text == expected
    assert "".join(r.token.text for r in streamed) == expected


def test_openai_client_through_the_router(stack):
    server_url, router_url, _, _ = stack
    client = openai.OpenAI(base_url=f"{router_url}/v1", api_key="unused", default_headers={"x-stillhouse-arm": "student"})
    expected = direct(server_url, "student", "Great food.")
    completion = client.completions.create(model="sentiment", prompt="Great food.", max_tokens=6, temperature=0)
    assert completion.choices[0].text == expected
    assert completion.usage.completion_tokens > 0
    stream = client.completions.create(model="sentiment", prompt="Great food.", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected
    chat = client.chat.completions.create(model="sentiment", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert chat.choices[0].message.content is not None


def test_both_logs_share_the_request_id(stack):
    _, router_url, router, root = stack
    response = httpx.post(f"{router_url}/generate", json={"inputs": "Nice.", "parameters": {"adapter_id": "sentiment", "max_new_tokens": 3}},
                          headers={"X-User-Id": "alice"}, timeout=60)
    request_id, arm = response.headers["x-request-id"], response.headers["x-stillhouse-arm"]
    router.request_log.flush()
    [routed] = [r.exchange for r in SQLiteStore(root / "router.db").query() if r.exchange.request_id == request_id]
    assert routed.arm == arm and routed.prompt == "Nice." and routed.generated_tokens == 3
    assert routed.unit_hash and "alice" not in routed.unit_hash
    assert routed.config_version == router.holder.config.version_hash
    assert routed.template_version is not None


def test_passthrough_reaches_the_server(stack):
    _, router_url, _, _ = stack
    client = lorax.Client(router_url)
    response = client.generate("Hello", adapter_id="student", max_new_tokens=3)
    assert response.details.generated_tokens == 3
