"""The torch engine against transformers/peft ``generate``, plus its queueing, adapters and decoding."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from serving.engines import sampling
from serving.engines.base import AdapterRef, GenerationRequest, SamplingParams, TokenEvent
from serving.engines.detokenizer import IncrementalDetokenizer
from serving.engines.torch_engine import TorchEngine
from serving.errors import GenerationError, IncompleteGenerationError, OverloadedError
from tests.lora_factory import make_lora_adapter

PROMPTS = [
    "Review: Lovely view and kind hosts.\nSentiment:",
    "The capital of France is",
    "Ünïcödé — café, naïve 😀 𓀀 and",
]
NEW_TOKENS = 12
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS)


# --- helpers ------------------------------------------------------------------------------


async def collect(engine: TorchEngine, prompt_ids: list[int], params: SamplingParams, adapter=None):
    """All streamed tokens and the final result of one request."""
    tokens, result = [], None
    async for event in engine.generate(GenerationRequest(prompt_ids, params, adapter)):
        if isinstance(event, TokenEvent):
            tokens.append(event.token)
        else:
            result = event
    return tokens, result


def generate(engine, prompt: str, params: SamplingParams = GREEDY, adapter=None):
    return asyncio.run(collect(engine, engine.tokenize(prompt), params, adapter))


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy ids from transformers' or peft's own ``generate``."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, len(prompt_ids) :].tolist()


async def wait_until(condition, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_base_dir, tmp_path_factory) -> dict[str, AdapterRef]:
    """Three adapters with non-zero weights: different seeds, ranks 8 and 16."""
    root = tmp_path_factory.mktemp("engine-adapters")
    specs = {"alpha@v1": (8, 1), "beta@v1": (16, 2), "gamma@v1": (8, 3)}
    return {
        adapter_id: AdapterRef(
            adapter_id, make_lora_adapter(tiny_base_dir, root / str(seed), r=r, alpha=2 * r, seed=seed, scale=0.2)
        )
        for adapter_id, (r, seed) in specs.items()
    }


@pytest.fixture(scope="module")
def engine(tiny_base_dir):
    engine = TorchEngine(tiny_base_dir, "tiny")
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


@pytest.fixture(scope="module")
def references(tiny_base_dir, engine, adapters) -> dict[tuple[str | None, str], list[int]]:
    """Greedy reference ids for every (adapter id or None, prompt)."""
    refs = {}
    for adapter in [None, *adapters.values()]:
        model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter.path).eval()
        for prompt in PROMPTS:
            refs[adapter and adapter.adapter_id, prompt] = reference_greedy(model, engine.tokenize(prompt), NEW_TOKENS)
    return refs


def small_engine(base_dir: Path, **kwargs) -> TorchEngine:
    engine = TorchEngine(base_dir, "tiny", **kwargs)
    asyncio.run(engine.start())
    return engine


# --- parity with transformers / peft ----------------------------------------------------


def test_greedy_matches_generate_for_base_and_each_adapter(engine, adapters, references):
    for adapter in [None, *adapters.values()]:
        for prompt in PROMPTS:
            tokens, result = generate(engine, prompt, adapter=adapter)
            assert [t.id for t in tokens] == references[adapter and adapter.adapter_id, prompt], (adapter, prompt)
            assert result.finish_reason == "length"
            assert result.generated_tokens == NEW_TOKENS


def test_concurrent_mixed_adapters_match_generate(engine, adapters, references):
    combos = [(adapter, prompt) for adapter in [None, *adapters.values()] for prompt in PROMPTS]

    async def all_at_once():
        return await asyncio.gather(*(collect(engine, engine.tokenize(p), GREEDY, a) for a, p in combos))

    for (adapter, prompt), (tokens, _) in zip(combos, asyncio.run(all_at_once())):
        assert [t.id for t in tokens] == references[adapter and adapter.adapter_id, prompt], (adapter, prompt)


def test_adapters_change_outputs(references, adapters):
    for prompt in PROMPTS:
        outputs = {tuple(references[a, prompt]) for a in [None, *adapters]}
        assert len(outputs) == 1 + len(adapters), prompt


def test_base_requests_ignore_resident_adapters(engine, adapters, references):
    asyncio.run(engine.load_adapter(adapters["alpha@v1"]))
    tokens, _ = generate(engine, PROMPTS[0])
    assert [t.id for t in tokens] == references[None, PROMPTS[0]]


# --- decoding and stopping ---------------------------------------------------------------


def test_sampling_is_reproducible_by_seed(engine):
    params = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=200, seed=7)
    first = generate(engine, PROMPTS[1], params)
    again = generate(engine, PROMPTS[1], params)
    other = generate(engine, PROMPTS[1], dataclasses.replace(params, seed=8))
    ids = lambda run: [t.id for t in run[0]]  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    assert first[1].seed == 7


def test_sampling_without_seed_reports_the_seed_it_used(engine):
    params = SamplingParams(max_new_tokens=8, do_sample=True)
    tokens, result = generate(engine, PROMPTS[1], params)
    assert result.seed is not None
    replay, _ = generate(engine, PROMPTS[1], dataclasses.replace(params, seed=result.seed))
    assert [t.id for t in replay] == [t.id for t in tokens]
    assert generate(engine, PROMPTS[1])[1].seed is None  # greedy has no seed


def test_logprobs_are_log_softmax_of_the_processed_logits(engine, tiny_base_dir):
    prompt_ids = engine.tokenize(PROMPTS[0])
    tokens, _ = asyncio.run(collect(engine, prompt_ids, SamplingParams(max_new_tokens=1)))
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, -1], -1)[tokens[0].id]
    assert tokens[0].logprob == pytest.approx(float(expected), abs=1e-4)


def test_repetition_penalty_matches_generate(engine, tiny_base_dir):
    prompt_ids = engine.tokenize(PROMPTS[0])
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=NEW_TOKENS, repetition_penalty=1.5
        )
    tokens, _ = asyncio.run(collect(engine, prompt_ids, dataclasses.replace(GREEDY, repetition_penalty=1.5)))
    assert [t.id for t in tokens] == out[0, len(prompt_ids) :].tolist()


def test_max_new_tokens_finishes_with_length(engine):
    tokens, result = generate(engine, PROMPTS[0], SamplingParams(max_new_tokens=3))
    assert (len(tokens), result.generated_tokens, result.finish_reason) == (3, 3, "length")


def test_stop_sequence_ends_generation_and_is_kept_in_the_text(engine, references):
    full_ids = references[None, PROMPTS[1]]
    detokenizer = IncrementalDetokenizer(engine.decode)
    pieces = [detokenizer.push(i) for i in full_ids]
    stop = "".join(pieces)[len("".join(pieces[:5])) :][:3]
    expected_tokens = next(n for n in range(1, len(pieces) + 1) if stop in "".join(pieces[:n]))
    tokens, result = generate(engine, PROMPTS[1], dataclasses.replace(GREEDY, stop=("never appears", stop)))
    assert result.finish_reason == "stop_sequence"
    assert len(tokens) == expected_tokens < NEW_TOKENS
    assert stop in result.generated_text
    assert result.generated_text == engine.decode(full_ids[:expected_tokens])


def test_eos_stops_generation_unless_ignored(engine, references, monkeypatch):
    full_ids = references[None, PROMPTS[0]]
    # the tiny random model never chooses its real EOS: declare its fourth greedy token one
    monkeypatch.setattr(engine, "eos_token_ids", frozenset({full_ids[3]}))
    tokens, result = generate(engine, PROMPTS[0])
    assert result.finish_reason == "eos_token"
    assert [t.id for t in tokens] == full_ids[:4]
    tokens, result = generate(engine, PROMPTS[0], dataclasses.replace(GREEDY, ignore_eos_token=True))
    assert result.finish_reason == "length"
    assert [t.id for t in tokens] == full_ids


def test_eos_ids_come_from_the_tokenizer_and_generation_config(engine):
    assert engine.eos_token_ids == {1, 106}  # <eos>, <end_of_turn>
    assert engine.decode([1, 106]) == ""  # <eos> and <end_of_turn> are special: never in the text


def test_streamed_text_concatenates_to_generated_text(engine, adapters):
    for adapter in [None, adapters["beta@v1"]]:
        for prompt in PROMPTS:
            tokens, result = generate(engine, prompt, SamplingParams(max_new_tokens=24), adapter)
            assert "".join(t.text for t in tokens) == result.generated_text
            assert result.generated_text == engine.decode([t.id for t in tokens])


def test_prefill_logprobs_match_a_direct_forward(engine, tiny_base_dir, adapters):
    prompt_ids = engine.tokenize(PROMPTS[0])
    params = SamplingParams(max_new_tokens=2, prefill_logprobs=True)
    adapter = adapters["gamma@v1"]
    for model_adapter in [None, adapter]:
        _, result = asyncio.run(collect(engine, prompt_ids, params, model_adapter))
        model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
        if model_adapter is not None:
            model = PeftModel.from_pretrained(model, adapter.path).eval()
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0], -1)
        assert [p.id for p in result.prefill] == prompt_ids
        assert result.prefill[0].logprob is None
        assert result.prefill[0].text == "<bos>"
        for i, token in enumerate(result.prefill[1:], start=1):
            assert token.logprob == pytest.approx(float(log_probs[i - 1, prompt_ids[i]]), abs=1e-4)


def test_timings_are_reported(engine):
    _, result = generate(engine, PROMPTS[0])
    assert 0 <= result.queue_time_s <= result.time_to_first_token_s <= result.total_time_s
    assert result.prompt_tokens == len(engine.tokenize(PROMPTS[0]))


# --- text helpers ------------------------------------------------------------------------


def test_incremental_detokenizer_holds_back_incomplete_characters(tiny_base_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base_dir)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    text = "Ünïcödé — café 😀 𓀀𓁐 ꙮ 🇫🇷 𝔘𝔫"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(t.startswith("<0x") for t in tokenizer.convert_ids_to_tokens(ids))  # byte fallback in play
    detokenizer = IncrementalDetokenizer(decode)
    pieces = [detokenizer.push(i) for i in ids]
    assert "".join(pieces) == decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # a character split over byte tokens waits for its last byte

    truncated = ids[: ids.index(tokenizer.convert_tokens_to_ids("<0xF0>")) + 2]
    detokenizer = IncrementalDetokenizer(decode)
    pieces = [detokenizer.push(i) for i in truncated]
    assert "".join(pieces) + detokenizer.flush() == decode(truncated)


def test_chat_template_leaves_bos_to_tokenize(engine):
    prompt = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("model\n")
    ids = engine.tokenize(prompt)
    assert ids.count(ids[0]) == 1  # one BOS, from tokenize


def test_chat_without_a_template_falls_back_to_role_lines(engine, monkeypatch):
    monkeypatch.setattr(engine.text.tokenizer, "chat_template", None)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert engine.apply_chat_template(messages) == "system: Be brief.\nuser: Hi\nassistant:"


# --- queueing, cancellation, adapters, shutdown ----------------------------------------


def test_full_queue_overloads_and_closed_streams_are_dropped(tiny_base_dir):
    engine = small_engine(tiny_base_dir, max_queue=1)

    async def scenario():
        prompt_ids = engine.tokenize(PROMPTS[0])
        long_run = engine.generate(GenerationRequest(prompt_ids, SamplingParams(max_new_tokens=2000)))
        assert isinstance(await long_run.__anext__(), TokenEvent)
        assert engine.queue_depth() == 1
        with pytest.raises(OverloadedError):
            await engine.generate(GenerationRequest(prompt_ids, GREEDY)).__anext__()
        await long_run.aclose()  # the client went away
        await wait_until(lambda: engine.queue_depth() == 0)
        _, result = await collect(engine, prompt_ids, SamplingParams(max_new_tokens=2))
        assert result.generated_tokens == 2

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(engine.stop())


def test_lru_eviction_never_evicts_an_adapter_in_use(tiny_base_dir, adapters, references):
    engine = small_engine(tiny_base_dir, max_active_adapters=2)
    alpha, beta, gamma = adapters.values()

    async def scenario():
        assert await engine.load_adapter(alpha) > 0
        assert await engine.load_adapter(beta) > 0
        assert await engine.load_adapter(alpha) == 0  # already resident: now most recently used
        await engine.load_adapter(gamma)
        assert engine.resident_adapters() == [alpha.adapter_id, gamma.adapter_id]

        # both resident adapters busy: a third one goes over capacity while they are in use
        long = SamplingParams(max_new_tokens=2000)
        busy = [engine.generate(GenerationRequest(engine.tokenize(PROMPTS[0]), long, a)) for a in (alpha, gamma)]
        for stream in busy:
            await stream.__anext__()
        beta_run = engine.generate(GenerationRequest(engine.tokenize(PROMPTS[1]), long, beta))
        tokens = [(await beta_run.__anext__()).token.id for _ in range(NEW_TOKENS)]
        assert tokens == references[beta.adapter_id, PROMPTS[1]]
        assert len(engine.resident_adapters()) == 3
        await beta_run.aclose()
        # beta, now the only idle adapter, is the one evicted
        await wait_until(lambda: engine.resident_adapters() == [alpha.adapter_id, gamma.adapter_id])
        for stream in busy:
            await stream.aclose()

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(engine.stop())


def test_unload_and_reload(tiny_base_dir, adapters, references):
    engine = small_engine(tiny_base_dir)
    alpha = adapters["alpha@v1"]

    async def scenario():
        await engine.load_adapter(alpha)
        assert await engine.unload_adapter(alpha.adapter_id)
        assert engine.resident_adapters() == []
        assert not await engine.unload_adapter(alpha.adapter_id)

        # an adapter in use disappears from the list at once and is dropped when its request ends
        long = SamplingParams(max_new_tokens=2000)
        running = engine.generate(GenerationRequest(engine.tokenize(PROMPTS[1]), long, alpha))
        await running.__anext__()
        assert await engine.unload_adapter(alpha.adapter_id)
        assert engine.resident_adapters() == []
        assert isinstance(await running.__anext__(), TokenEvent)
        await running.aclose()
        await wait_until(lambda: engine.queue_depth() == 0)

        base_tokens, _ = await collect(engine, engine.tokenize(PROMPTS[0]), GREEDY)
        assert [t.id for t in base_tokens] == references[None, PROMPTS[0]]
        tokens, _ = await collect(engine, engine.tokenize(PROMPTS[0]), GREEDY, alpha)  # loads on demand
        assert [t.id for t in tokens] == references[alpha.adapter_id, PROMPTS[0]]
        assert engine.resident_adapters() == [alpha.adapter_id]

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(engine.stop())


def test_a_missing_adapter_fails_only_its_request(engine, tmp_path):
    missing = AdapterRef("missing@v1", tmp_path / "nothing-here")
    with pytest.raises(GenerationError):
        generate(engine, PROMPTS[0], adapter=missing)
    assert generate(engine, PROMPTS[0])[1].finish_reason == "length"


def test_stop_fails_running_and_waiting_requests(tiny_base_dir):
    engine = small_engine(tiny_base_dir, max_active=1)

    async def scenario():
        prompt_ids = engine.tokenize(PROMPTS[0])
        running = engine.generate(GenerationRequest(prompt_ids, SamplingParams(max_new_tokens=2000)))
        await running.__anext__()
        waiting = asyncio.ensure_future(collect(engine, prompt_ids, GREEDY))
        await wait_until(lambda: engine.queue_depth() == 2)
        await engine.stop()
        with pytest.raises(IncompleteGenerationError):
            async for _ in running:
                pass
        with pytest.raises(IncompleteGenerationError):
            await waiting
        with pytest.raises(GenerationError):
            await engine.generate(GenerationRequest(prompt_ids, GREEDY)).__anext__()

    asyncio.run(scenario())


# --- processors ------------------------------------------------------------------------------

INF = float("-inf")


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, -0.5])
    seen = torch.tensor([True, True, False, False])
    assert sampling.apply_repetition_penalty(logits, seen, 2.0).tolist() == [1.0, -2.0, 0.5, -0.5]


def test_temperature_scales_logits():
    assert sampling.apply_temperature(torch.tensor([1.0, -2.0]), 0.5).tolist() == [2.0, -4.0]


def test_top_k_keeps_the_k_best_and_ties():
    assert sampling.filter_top_k(torch.tensor([1.0, 3.0, 2.0, 0.0]), 2).tolist() == [INF, 3.0, 2.0, INF]
    assert sampling.filter_top_k(torch.tensor([1.0, 2.0, 2.0, 0.0]), 1).tolist() == [INF, 2.0, 2.0, INF]


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    kept = sampling.filter_top_p(logits, 0.75)  # 0.5 + 0.3 is the first sum reaching 0.75
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    assert torch.isfinite(sampling.filter_top_p(logits, 0.01)).tolist() == [True, False, False, False]


def test_typical_keeps_tokens_closest_to_the_entropy():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    # entropy 1.142 nats; surprisals 0.693, 1.204, 1.897, 2.996: token 1 is the most typical
    assert math.isclose(float(-(probs * logits).sum()), 1.1422, abs_tol=1e-3)
    assert torch.isfinite(sampling.filter_typical(logits, 0.2)).tolist() == [False, True, False, False]
    assert torch.isfinite(sampling.filter_typical(logits, 0.5)).tolist() == [True, True, False, False]
    assert torch.isfinite(sampling.filter_typical(logits, 0.9)).tolist() == [True, True, True, False]


def test_processors_agree_with_transformers():
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.tensor([[3, 17, 17, 250]])
    seen = torch.zeros(500, dtype=torch.bool)
    seen[ids[0]] = True
    penalty = RepetitionPenaltyLogitsProcessor(1.3)
    pairs = [
        (sampling.apply_repetition_penalty(logits[0], seen, 1.3), penalty(ids, logits.clone())),
        (sampling.filter_top_k(logits[0], 40), TopKLogitsWarper(40)(ids, logits.clone())),
        (sampling.filter_top_p(logits[0], 0.9), TopPLogitsWarper(0.9)(ids, logits.clone())),
        (sampling.filter_typical(logits[0], 0.7), TypicalLogitsWarper(0.7)(ids, logits.clone())),
    ]
    for ours, theirs in pairs:
        assert torch.equal(ours, theirs[0])


def test_choose_token_greedy_and_sampled():
    logits = torch.tensor([1.0, 4.0, 2.0, 3.0])
    token, logprob = sampling.choose_token(logits, SamplingParams(), None, None)
    assert token == 1 and logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1]))
    # temperature 0 is greedy even with do_sample
    assert sampling.choose_token(logits, SamplingParams(do_sample=True, temperature=0), None, None)[0] == 1
    params = SamplingParams(top_k=2, seed=0)
    draws = {sampling.choose_token(logits, params, None, torch.Generator().manual_seed(s))[0] for s in range(50)}
    assert draws == {1, 3}
    token, logprob = sampling.choose_token(logits, params, None, torch.Generator().manual_seed(0))
    assert logprob == pytest.approx(float(torch.log_softmax(torch.tensor([4.0, 3.0]), -1)[0 if token == 1 else 1]))


def test_choose_greedy_equals_choose_token_row_by_row():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 3
    logits[2, 20] = logits[2, 10] = logits[2].max() + 1  # a tie: the first index wins, as in argmax
    tokens, logprobs = sampling.choose_greedy(logits)
    assert list(zip(tokens, logprobs)) == [sampling.choose_token(row, SamplingParams(), None, None) for row in logits]
    assert tokens[2] == 10


def test_plain_greedy_is_argmax_without_processors_or_alternatives():
    assert sampling.is_plain_greedy(SamplingParams())
    assert sampling.is_plain_greedy(SamplingParams(alternatives=0, repetition_penalty=1.0, temperature=0))
    for params in (SamplingParams(do_sample=True), SamplingParams(repetition_penalty=1.2), SamplingParams(alternatives=2)):
        assert not sampling.is_plain_greedy(params)


# --- the real base model ------------------------------------------------------------------


@pytest.mark.slow
def test_real_base_greedy_matches_peft_generate(real_base_dir, tmp_path):
    adapters = []
    for r, seed in [(8, 1), (16, 2)]:
        path = make_lora_adapter(real_base_dir, tmp_path / str(seed), r=r, alpha=2 * r, seed=seed, scale=0.02)
        adapters.append(AdapterRef(f"real{seed}@v1", path))
    params = SamplingParams(max_new_tokens=16)
    combos = [(adapter, prompt) for adapter in [None, *adapters] for prompt in PROMPTS]
    engine = small_engine(real_base_dir)

    async def all_at_once():
        return await asyncio.gather(*(collect(engine, engine.tokenize(p), params, a) for a, p in combos))

    try:
        results = dict(zip(combos, asyncio.run(all_at_once())))
    finally:
        asyncio.run(engine.stop())
    for adapter in [None, *adapters]:
        model = AutoModelForCausalLM.from_pretrained(real_base_dir, dtype=torch.float32).eval()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter.path).eval()
        for prompt in PROMPTS:
            expected = reference_greedy(model, engine.tokenize(prompt), params.max_new_tokens)
            tokens, result = results[adapter, prompt]
            assert [t.id for t in tokens] == expected, (adapter, prompt)
            assert "".join(t.text for t in tokens) == result.generated_text
    for prompt in PROMPTS:
        assert len({tuple(t.id for t in results[a, prompt][0]) for a in [None, *adapters]}) > 1, prompt
