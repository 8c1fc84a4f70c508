"""Top-k alternatives per generated token: LoRAX ``return_k_alternatives`` and OpenAI completions
``logprobs``, read by the real lorax-client and openai client from the torch engine."""

from __future__ import annotations

import asyncio
import math

import httpx
import lorax
import openai
import pytest
import torch

from serving.engines import sampling
from serving.engines.base import SamplingParams
from tests.serving.server_harness import running_server

PROMPT = "Review: Lovely view and kind hosts.\nSentiment:"


@pytest.fixture(scope="module")
def url(tiny_base_dir, tmp_path_factory):
    with running_server(tiny_base_dir, tmp_path_factory.mktemp("registry")) as (base_url, _):
        yield base_url


def test_alternatives_come_from_the_chosen_tokens_distribution():
    logits = torch.tensor([1.0, 4.0, 2.0, 3.0, 0.5])
    token, logprob, ranked = sampling.choose_token_with_alternatives(logits, SamplingParams(), None, None, 3)
    assert token == 1 and [i for i, _ in ranked] == [1, 3, 2]
    assert ranked[0][1] == logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1]))
    # sampling with top_k=2 leaves two tokens: the others (-inf) are never alternatives
    params = SamplingParams(top_k=2, temperature=0.7)
    token, logprob, ranked = sampling.choose_token_with_alternatives(logits, params, None, torch.Generator().manual_seed(0), 4)
    assert [i for i, _ in ranked] == [1, 3]
    assert dict(ranked)[token] == logprob
    assert math.fsum(math.exp(v) for _, v in ranked) == pytest.approx(1.0)


@pytest.mark.parametrize("stream", [False, True])
def test_lorax_client_reads_k_alternatives(url, stream):
    client = lorax.Client(url)
    if stream:  # only the async client streams with return_k_alternatives

        async def collect():
            stream = lorax.AsyncClient(url).generate_stream(PROMPT, max_new_tokens=4, return_k_alternatives=3)
            return [event.token async for event in stream]

        tokens = asyncio.run(collect())
    else:
        tokens = client.generate(PROMPT, max_new_tokens=4, return_k_alternatives=3).details.tokens
    assert len(tokens) == 4
    for token in tokens:
        alternatives = token.alternative_tokens
        assert 1 <= len(alternatives) <= 3
        scores = [a.logprob for a in alternatives]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
        # greedy: the chosen token is the best one, with the very same logprob
        assert alternatives[0].id == token.id and alternatives[0].logprob == token.logprob
    plain = client.generate(PROMPT, max_new_tokens=4)
    assert all(token.alternative_tokens is None for token in plain.details.tokens)
    assert [t.id for t in plain.details.tokens] == [t.id for t in tokens]


def test_lorax_sampled_alternatives_hold_the_chosen_tokens_logprob(url):
    response = lorax.Client(url).generate(PROMPT, max_new_tokens=6, do_sample=True, temperature=1.5, seed=3, return_k_alternatives=20)
    for token in response.details.tokens:
        by_id = {a.id: a.logprob for a in token.alternative_tokens}
        if token.id in by_id:
            assert by_id[token.id] == token.logprob


def test_openai_completions_logprobs(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    response = client.completions.create(model="", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == 4
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.text_offset[0] == 0
    for name, score, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 3
        assert list(top.values()) == sorted(top.values(), reverse=True)
        assert top[name] == score == max(top.values())

    # token ids instead of texts (vLLM's extension), and logprobs=0: only the chosen token
    ids = client.completions.create(
        model="", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0, extra_body={"return_tokens_as_token_ids": True}
    ).choices[0].logprobs
    assert all(name.startswith("token_id:") for name in ids.tokens)
    assert [list(top) for top in ids.top_logprobs] == [[name] for name in ids.tokens]
    assert ids.token_logprobs == logprobs.token_logprobs
    plain = client.completions.create(model="", prompt=PROMPT, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_sampled_openai_top_logprobs_include_the_chosen_token(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    response = client.completions.create(model="", prompt=PROMPT, max_tokens=6, temperature=1.5, seed=5, logprobs=2,
                                         extra_body={"return_tokens_as_token_ids": True})
    logprobs = response.choices[0].logprobs
    for name, score, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) <= 3 and top[name] == score  # the two best, plus the chosen one when it is not among them


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/generate", {"inputs": "x", "parameters": {"return_k_alternatives": 21}}, "return_k_alternatives"),
        ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": 2, "stream": True}, "stream=false"),
        ("/v1/completions", {"prompt": "x", "logprobs": 2, "echo": True}, "echo=false"),
    ],
)
def test_too_many_alternatives_are_422(url, path, body, field):
    response = httpx.post(f"{url}{path}", json=body)
    assert response.status_code == 422
    assert response.json()["error_type"] == "validation"
    error = response.json()["error"]
    assert field in error
    assert "false" in field or "from" in error and "20" in error  # the fix: the allowed range


def test_lorax_client_sees_a_validation_error(url):
    with pytest.raises(lorax.errors.ValidationError, match="return_k_alternatives"):
        lorax.Client(url).generate(PROMPT, max_new_tokens=2, return_k_alternatives=100)


def test_vllm_top_logprobs_become_the_k_best_alternatives(tiny_base_dir):
    from types import SimpleNamespace

    from serving.engines.base import Alternative
    from serving.engines.model_text import ModelText
    from serving.engines.vllm_engine import VllmEngine
    from transformers import AutoConfig

    text = ModelText(tiny_base_dir, AutoConfig.from_pretrained(tiny_base_dir).get_text_config(decoder=True))
    stub = SimpleNamespace(text=text)
    # vLLM's entry holds the chosen token too, even when it is not among the k best
    top = {"token_id:5": -2.0, "token_id:9": -0.5, "token_id:3": -1.0}
    assert VllmEngine._alternatives(stub, top, 2) == (
        Alternative(9, text.tokenizer.decode([9]), -0.5),
        Alternative(3, text.tokenizer.decode([3]), -1.0),
    )
    assert VllmEngine._alternatives(stub, top, None) is None
    assert VllmEngine._alternatives(stub, None, 0) == ()
