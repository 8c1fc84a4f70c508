"""Structured output through the real lorax-client and openai clients, over loopback HTTP.

The tiny base has random weights, so without the constraint its output is gibberish: every
answer parsing under its schema, regex or choice list is the grammar's doing. The protocol tests
assert only what the constraint guarantees, so the vLLM engine runs them unchanged.
"""

from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import lorax
import openai
import pytest

from serving.engines.constraint import ConstraintSpec
from serving.registry import Registry
from tests.lora_factory import make_lora_adapter
from tests.serving.server_harness import running_server

PROMPT = "Review: The soup was cold and the waiter ignored us.\nSentiment:"
LABELS = ["positive", "negative", "neutral"]
# An enum, a bounded integer and required fields: every completed answer is short.
REVIEW_SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": LABELS},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["label", "stars"],
}
REGEX = r"(yes|no), [a-z]{2,6}"
SEEDS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_base_dir):
    registry_dir = tmp_path_factory.mktemp("structured") / "registry"
    source = make_lora_adapter(tiny_base_dir, registry_dir.parent / "alpha", r=8, alpha=16, seed=1, scale=0.2)
    Registry(registry_dir).add(source, "alpha", base_dir=tiny_base_dir)
    with running_server(tiny_base_dir, registry_dir) as (url, service):
        yield url, service


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def assert_review(text: str) -> None:
    jsonschema.validate(json.loads(text), REVIEW_SCHEMA)


# --- LoRAX protocol ----------------------------------------------------------------------------


def test_lorax_response_format_schema_always_parses(server):
    url, _ = server
    client = lorax.Client(url)
    response_format = {"type": "json_object", "schema": REVIEW_SCHEMA}
    greedy = client.generate(PROMPT, max_new_tokens=40, response_format=response_format)
    assert_review(greedy.generated_text)
    assert greedy.details.finish_reason == "eos_token"
    for seed in SEEDS:
        sampled = client.generate(PROMPT, adapter_id="alpha", max_new_tokens=40, do_sample=True, seed=seed,
                                  response_format=response_format)  # fmt: skip
        assert_review(sampled.generated_text)


def test_lorax_stream_under_a_schema(server):
    url, _ = server
    client = lorax.Client(url)
    response_format = {"type": "json_object", "schema": REVIEW_SCHEMA}
    events = list(client.generate_stream(PROMPT, max_new_tokens=40, do_sample=True, seed=7, response_format=response_format))
    text = "".join(event.token.text for event in events if not event.token.special)
    assert text == events[-1].generated_text
    assert_review(text)


def test_lorax_json_schema_type_over_raw_http(server):
    url, _ = server
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "response_format": {"type": "json_schema", "schema": REVIEW_SCHEMA}}}
    response = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert_review(response.json()["generated_text"])


def test_lorax_uncompilable_schema_is_422_naming_the_field(server):
    url, _ = server
    client = lorax.Client(url)
    bad = {"type": "json_object", "schema": {"type": "object", "properties": {"n": {"type": "number", "minimum": 5, "maximum": 1}}}}
    with pytest.raises(lorax.errors.ValidationError, match=r"parameters\.response_format\.schema"):
        client.generate(PROMPT, max_new_tokens=8, response_format=bad)
    with pytest.raises(lorax.errors.ValidationError, match=r"parameters\.response_format\.schema"):
        next(iter(client.generate_stream(PROMPT, max_new_tokens=8, response_format=bad)))
    with pytest.raises(lorax.errors.ValidationError, match="ignore_eos_token"):
        client.generate(PROMPT, max_new_tokens=8, ignore_eos_token=True, response_format={"type": "json_object", "schema": REVIEW_SCHEMA})


# --- OpenAI protocol ---------------------------------------------------------------------------


def test_openai_json_schema_chat_and_completions(server):
    url, _ = server
    client = openai_client(url)
    response_format = {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW_SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": PROMPT}]
    for seed in SEEDS:
        chat = client.chat.completions.create(model="", messages=messages, max_tokens=40, seed=seed, response_format=response_format)
        assert_review(chat.choices[0].message.content)
        assert chat.choices[0].finish_reason == "stop"
    completion = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=40, temperature=0,
                                           extra_body={"response_format": response_format})  # fmt: skip
    assert_review(completion.choices[0].text)
    chunks = list(client.chat.completions.create(model="", messages=messages, max_tokens=40, seed=5, stream=True, response_format=response_format))
    assert_review("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))


def test_openai_json_object_is_an_object_or_cut_by_length(server):
    url, _ = server
    client = openai_client(url)
    finished = 0
    for seed in range(6):
        messages = [{"role": "user", "content": PROMPT}]
        choice = client.chat.completions.create(model="", messages=messages, max_tokens=24, seed=seed, response_format={"type": "json_object"}).choices[0]
        text = choice.message.content
        assert text.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            finished += 1
        else:
            assert choice.finish_reason == "length"
    assert finished > 0


def test_openai_guided_choice_streaming_and_not(server):
    url, _ = server
    client = openai_client(url)
    for seed in SEEDS:
        text = client.completions.create(model="", prompt=PROMPT, max_tokens=8, seed=seed, extra_body={"guided_choice": LABELS}).choices[0].text
        assert text in LABELS
    chunks = list(client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, seed=3, stream=True,
        extra_body={"guided_choice": LABELS},
    ))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) in LABELS


def test_openai_guided_regex_and_structured_outputs(server):
    url, _ = server
    client = openai_client(url)
    for seed in SEEDS:
        text = client.completions.create(model="", prompt=PROMPT, max_tokens=16, seed=seed, extra_body={"guided_regex": REGEX}).choices[0].text
        assert re.fullmatch(REGEX, text), text
    choices = ['say "hi"', "two\nlines", "tab\there"]
    for seed in SEEDS:
        newer = client.completions.create(model="", prompt=PROMPT, max_tokens=16, seed=seed, extra_body={"structured_outputs": {"choice": choices}})
        assert newer.choices[0].text in choices
    as_json_text = client.completions.create(model="", prompt=PROMPT, max_tokens=40, temperature=0, extra_body={"guided_json": json.dumps(REVIEW_SCHEMA)})
    assert_review(as_json_text.choices[0].text)


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"guided_json": {"type": "nonsense"}}, "guided_json"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}}, "response_format.json_schema.schema"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "at most one of"),
        ({"structured_outputs": {"grammar": "root ::= \"a\""}}, "structured_outputs.grammar"),
    ],
)
def test_openai_bad_constraints_are_422_naming_the_field(server, extra, field):
    url, _ = server
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        openai_client(url).completions.create(model="", prompt=PROMPT, max_tokens=4, extra_body=extra)
    assert field in str(caught.value.body)
    streamed = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}], "stream": True, **extra})
    assert streamed.status_code == 422  # refused before the stream opens
    assert streamed.json()["error_type"] == "validation" and field in streamed.json()["error"]


# --- the torch engine: the mask is per row -----------------------------------------------------


def test_constrained_and_free_requests_side_by_side(server):
    """A constraint changes only its own request: a free one decoding alongside is unaffected."""
    url, _ = server
    client = lorax.Client(url)
    alone = client.generate(PROMPT, adapter_id="alpha", max_new_tokens=24).generated_text
    results: dict[str, str] = {}

    def constrained(key: str, seed: int) -> None:
        results[key] = client.generate(PROMPT, max_new_tokens=40, do_sample=True, seed=seed,
                                       response_format={"type": "json_object", "schema": REVIEW_SCHEMA}).generated_text  # fmt: skip

    threads = [threading.Thread(target=constrained, args=(f"c{seed}", seed)) for seed in SEEDS]
    threads.append(threading.Thread(target=lambda: results.update(free=client.generate(PROMPT, adapter_id="alpha", max_new_tokens=24).generated_text)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert results["free"] == alone
    for seed in SEEDS:
        assert_review(results[f"c{seed}"])


def test_compiled_grammars_are_cached(server):
    url, service = server
    openai_client(url).completions.create(model="", prompt=PROMPT, max_tokens=4, extra_body={"guided_choice": LABELS})
    spec = ConstraintSpec.choice(LABELS, "guided_choice")
    first = service._grammars.compile(spec)
    assert service._grammars.compile(ConstraintSpec.choice(LABELS, "structured_outputs.choice")) is first


def test_vllm_form_of_each_constraint():
    assert ConstraintSpec.json_schema(None, "response_format").vllm() == {"json": {"type": "object"}}
    assert ConstraintSpec.json_schema(REVIEW_SCHEMA, "guided_json").vllm() == {"json": REVIEW_SCHEMA}
    assert ConstraintSpec.regex(REGEX, "guided_regex").vllm() == {"regex": REGEX}
    assert ConstraintSpec.choice(LABELS, "guided_choice").vllm() == {"choice": LABELS}
