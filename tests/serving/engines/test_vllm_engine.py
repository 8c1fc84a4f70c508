"""The vLLM engine against real vLLM (from .venv-vllm) on the real gemma-3-270m base.

One vLLM server starts per run: `stillhouse serve --engine vllm` is launched once as a
subprocess (our server in front, vLLM its child). The protocol tests of the torch engine run
unchanged against it, the parity test attaches a second ``VllmEngine`` to the same vLLM, and
the last test SIGKILLs the parent and checks vLLM goes with it.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import lorax
import openai
import pytest

from serving.engines.base import AdapterRef, GenerationRequest, GenerationResult, SamplingParams
from serving.engines.torch_engine import TorchEngine
from serving.engines.vllm_engine import VllmEngine
from serving.engines.vllm_install import DEFAULT_VENV, venv_python
from serving.engines.vllm_process import max_lora_rank_for
from serving.errors import AdapterNotServableError, OverloadedError
from serving.loopback import free_port
from serving.registry import Registry
from tests.lora_factory import make_lora_adapter
from tests.serving import test_server as torch_protocol

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ADMIN = torch_protocol.ADMIN
STARTUP_TIMEOUT_S = 900
NEW_TOKENS = 16
# A first divergence counts as a near tie when the torch engine's own log-probabilities of the two
# candidate tokens differ by less than this (nats): 0.05 is a 5% probability ratio, far above
# float32 rounding yet far below what a real difference between the engines would produce.
NEAR_TIE_NATS = 0.05
PARITY_ADAPTERS = ("alpha", "beta", "gamma")
PARITY_PROMPTS = [
    "The capital of France is",
    "Review: Lovely view and kind hosts.\nSentiment:",
    "Review: The soup was cold and the waiter ignored us.\nSentiment:",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite book is",
    "Translate to French: Good morning, how are you?\n",
    "Q: What is 12 times 12?\nA:",
    "The quick brown fox",
    "In 1969, the first humans",
    "Photosynthesis is the process by which",
    "Here is a list of fruits: apple, banana,",
    "The best way to learn a language is",
    "import numpy as np\n",
    "Dear hiring manager,",
    "The weather today is",
    "Ünïcödé — café, naïve and",
    "Step 1: Preheat the oven to",
]


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().split(")")[-1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid) and not _group_members(pid):
            return True
        time.sleep(0.2)
    return False


# --- one vLLM for the module ---------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_venv() -> Path:
    if not venv_python(DEFAULT_VENV).exists():
        pytest.fail("no .venv-vllm: run `make vllm` (or `stillhouse engines install vllm`) first")
    return DEFAULT_VENV


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, real_base_dir):
    """Three registered peft adapters on the real base: r=8, r=16, r=8, all seven projections."""
    root = tmp_path_factory.mktemp("vllm-adapters")
    registry_dir = root / "registry"
    registry = Registry(registry_dir)
    sources = {}
    for name, r, seed in [("alpha", 8, 1), ("beta", 16, 2), ("gamma", 8, 3)]:
        sources[name] = make_lora_adapter(real_base_dir, root / name, r=r, alpha=2 * r, seed=seed, scale=0.05)
        registry.add(sources[name], name, base_dir=real_base_dir)
    return registry_dir, sources


@pytest.fixture(scope="module")
def served(vllm_venv, real_base_dir, adapters, tmp_path_factory):
    """`stillhouse serve --engine vllm` as a subprocess; yields its URL and its vLLM child's."""
    registry_dir, _ = adapters
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [
        sys.executable, "-m", "stillhouse", "serve", "--engine", "vllm", "--base", str(real_base_dir),
        "--registry", str(registry_dir), "--port", str(port), "--admin-token", ADMIN, "--max-queue", "16",
        "--max-total-tokens", "2048", "--dtype", "float32",
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        parent = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[3])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    started = time.monotonic()
    while True:
        if parent.poll() is not None:
            pytest.fail(f"stillhouse serve --engine vllm exited ({parent.returncode}):\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            parent.kill()
            pytest.fail(f"stillhouse serve --engine vllm did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)
    print(f"\nvLLM behind stillhouse serve ready in {time.monotonic() - started:.0f} s")
    match = re.search(r"vllm: pid (\d+) starting on (\S+)", log_path.read_text())
    assert match, log_path.read_text()
    vllm_pid, vllm_url = int(match.group(1)), match.group(2)
    yield {"url": url, "vllm_url": vllm_url, "vllm_pid": vllm_pid, "parent": parent, "log": log_path}
    if parent.poll() is None:
        parent.terminate()
        parent.wait(timeout=60)
    assert _wait_gone(vllm_pid, 60), f"vLLM (pid {vllm_pid}) outlived its parent"


@pytest.fixture(scope="module")
def server(served):
    """What the torch engine's protocol tests expect: (base URL, service); the service is remote here."""
    return served["url"], None


# --- the torch engine's protocol tests, unchanged, through `stillhouse serve --engine vllm` -----

test_lorax_stream_concatenates_to_the_final_text = torch_protocol.test_lorax_stream_concatenates_to_the_final_text
test_lorax_async_client = torch_protocol.test_lorax_async_client
test_stop_sequences_seed_and_full_text = torch_protocol.test_stop_sequences_seed_and_full_text
test_decoder_input_details = torch_protocol.test_decoder_input_details
test_lorax_errors_map_to_client_exceptions = torch_protocol.test_lorax_errors_map_to_client_exceptions
test_raw_lorax_routes_and_headers = torch_protocol.test_raw_lorax_routes_and_headers
test_invalid_requests_are_422_with_the_field = torch_protocol.test_invalid_requests_are_422_with_the_field
test_malformed_json_is_422 = torch_protocol.test_malformed_json_is_422
test_openai_stop_is_excluded_and_errors_raise = torch_protocol.test_openai_stop_is_excluded_and_errors_raise
test_adapters_change_the_output = torch_protocol.test_adapters_change_the_output
test_admin_requires_the_token = torch_protocol.test_admin_requires_the_token
test_per_adapter_metrics = torch_protocol.test_per_adapter_metrics


def test_openai_completions_and_chat(served):
    url = served["url"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    prompt = torch_protocol.PROMPTS[1]
    lorax_text = lorax.Client(url).generate(prompt, adapter_id="alpha", max_new_tokens=6).generated_text
    completion = client.completions.create(model="alpha", prompt=prompt, max_tokens=6, temperature=0)
    assert completion.choices[0].text == lorax_text
    chunks = list(client.completions.create(model="alpha", prompt=prompt, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == lorax_text
    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(model="beta", messages=messages, max_tokens=5, temperature=0)
    streamed = list(client.chat.completions.create(model="beta", messages=messages, max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    base_name = httpx.get(f"{url}/info").json()["model_id"]
    base = client.completions.create(model=base_name, prompt=prompt, max_tokens=4, temperature=0)
    assert base.choices[0].text == lorax.Client(url).generate(prompt, max_new_tokens=4).generated_text


def test_adapters_are_loaded_into_vllm_under_their_ids(served):
    lorax.Client(served["url"]).generate("hi", adapter_id="gamma", max_new_tokens=2)
    models = httpx.get(f"{served['vllm_url']}/v1/models").json()["data"]
    assert {"alpha@v1", "gamma@v1"} <= {m["id"] for m in models}


# --- the engine directly --------------------------------------------------------------------


def test_max_lora_rank_follows_the_registry_within_the_profile():
    assert max_lora_rank_for([]) == 16
    assert max_lora_rank_for([8, 16]) == 16
    assert max_lora_rank_for([8, 32]) == 32
    assert max_lora_rank_for([12]) == 16
    assert max_lora_rank_for([64, 128], frozenset({8, 16, 32, 64})) == 64


def test_adapters_vllm_rejects_report_vllms_message(served, real_base_dir, tmp_path):
    async def run():
        engine = VllmEngine(real_base_dir, "unused", url=served["vllm_url"], max_lora_rank=16)
        await engine.start()
        try:
            with pytest.raises(AdapterNotServableError, match="vLLM refused adapter missing@v1") as caught:
                await engine.load_adapter(AdapterRef("missing@v1", tmp_path / "no-such-adapter"))
            too_big = make_lora_adapter(real_base_dir, tmp_path / "r32", r=32, alpha=32)
            with pytest.raises(AdapterNotServableError, match="max-lora-rank 16"):
                await engine.load_adapter(AdapterRef("big@v1", too_big))
            return caught.value.message
        finally:
            await engine.stop()

    message = asyncio.run(run())
    assert len(message) > len("vLLM refused adapter missing@v1 (400): ")


def test_overload_is_refused_before_reaching_vllm(served, real_base_dir):
    async def run():
        engine = VllmEngine(real_base_dir, "unused", url=served["vllm_url"], max_queue=1)
        await engine.start()
        try:
            prompt = engine.tokenize("Once upon a time")
            long = engine.generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=64, ignore_eos_token=True)))
            first = await long.__anext__()
            with pytest.raises(OverloadedError, match="queue is full"):
                await engine.generate(GenerationRequest(prompt, SamplingParams(max_new_tokens=1))).__anext__()
            rest = [event async for event in long]
            return first, rest
        finally:
            await engine.stop()

    first, rest = asyncio.run(run())
    assert rest[-1].generated_tokens == 64 and rest[-1].finish_reason == "length"


async def _greedy_all(engine, requests):
    results = await asyncio.gather(*(_complete(engine, request) for request in requests))
    return [[t.id for t in result.tokens] for result in results], results


async def _complete(engine, request) -> GenerationResult:
    async for event in engine.generate(request):
        if isinstance(event, GenerationResult):
            return event
    raise AssertionError("no result")


def test_greedy_parity_with_the_torch_engine(served, adapters, real_base_dir):
    """≥ 20 prompts × 3 adapters, 16 greedy tokens each: vLLM and the torch engine agree."""
    registry_dir, _ = adapters
    registry = Registry(registry_dir)
    refs = {name: AdapterRef(registry.resolve(name).id, registry.resolve(name).path) for name in PARITY_ADAPTERS}
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos_token=True)

    async def run():
        vllm = VllmEngine(real_base_dir, "unused", url=served["vllm_url"], max_lora_rank=16, max_queue=256)
        torch_engine = TorchEngine(real_base_dir, "gemma-3-270m", max_queue=256, max_active_adapters=4, max_active=16)
        await vllm.start()
        await torch_engine.start()
        try:
            requests = [
                GenerationRequest(torch_engine.tokenize(p), params, refs[a]) for a in PARITY_ADAPTERS for p in PARITY_PROMPTS
            ]
            started = time.monotonic()
            vllm_ids, vllm_results = await _greedy_all(vllm, requests)
            print(f"\nparity: vLLM {time.monotonic() - started:.0f} s", end="")
            started = time.monotonic()
            torch_ids, torch_results = await _greedy_all(torch_engine, requests)
            print(f", torch engine {time.monotonic() - started:.0f} s")
            # At each first divergence: the torch engine's log-probabilities of both candidates.
            gaps = []
            for request, ours, theirs, ours_result in zip(requests, torch_ids, vllm_ids, torch_results):
                if ours == theirs:
                    continue
                k = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
                probe = GenerationRequest(
                    request.prompt_ids + ours[:k] + [theirs[k]],
                    SamplingParams(max_new_tokens=1, prefill_logprobs=True),
                    request.adapter,
                )
                prefill = (await _complete(torch_engine, probe)).prefill
                gaps.append((request, k, ours_result.tokens[k].logprob - prefill[-1].logprob))
            return requests, torch_ids, vllm_ids, torch_results, vllm_results, gaps
        finally:
            await vllm.stop()
            await torch_engine.stop()

    requests, torch_ids, vllm_ids, torch_results, vllm_results, gaps = asyncio.run(run())
    # Cross-engine noise: chosen-token log-probabilities where both engines chose the same token.
    noise = [
        abs(t.logprob - v.logprob)
        for tr, vr in zip(torch_results, vllm_results)
        for t, v in zip(tr.tokens, vr.tokens)
        if t.id == v.id
    ]
    lines = ["", f"{'adapter':<10} {'identical':>9} {'of':>3} {'rate':>6}"]
    for name in PARITY_ADAPTERS:
        pairs = [(t, v) for r, t, v in zip(requests, torch_ids, vllm_ids) if r.adapter.adapter_id.startswith(name + "@")]
        same = sum(t == v for t, v in pairs)
        lines.append(f"{name:<10} {same:>9} {len(pairs):>3} {same / len(pairs):>6.1%}")
    total_same = sum(t == v for t, v in zip(torch_ids, vllm_ids))
    rate = total_same / len(requests)
    lines.append(f"{'all':<10} {total_same:>9} {len(requests):>3} {rate:>6.1%}")
    lines.append(f"max |Δ logprob| over agreeing tokens: {max(noise):.2e} (median {sorted(noise)[len(noise) // 2]:.2e})")
    for request, k, gap in gaps:
        lines.append(f"  differs at token {k} ({request.adapter.adapter_id}): torch top-2 gap {gap:.4f} nats")
    print("\n".join(lines))
    assert len(requests) >= 60 and all(len(ids) == NEW_TOKENS for ids in vllm_ids + torch_ids)
    assert rate >= 0.95, "\n".join(lines)
    assert all(0 <= gap < NEAR_TIE_NATS for _, _, gap in gaps), "\n".join(lines)


# --- the child dies with its parent ---------------------------------------------------------

_PARENT = """
import sys, time
from serving.engines.vllm_process import VllmProcess
process = VllmProcess(sys.argv[1], "x")
process.launch()
print(process.pid, flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_child_is_gone_after_the_parent_exits(vllm_venv, real_base_dir):
    parent = subprocess.run(
        [sys.executable, "-c", _PARENT, str(real_base_dir), "3"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[3],
    )  # fmt: skip
    pid = int(parent.stdout.split()[0])
    assert parent.returncode == 0, parent.stderr
    assert _wait_gone(pid, 30), f"vLLM (pid {pid}) outlived its parent's exit"


def test_child_dies_when_the_parent_is_killed(served):
    """Last in this module: SIGKILL the serving parent; the kernel's PDEATHSIG takes vLLM down."""
    parent, pid = served["parent"], served["vllm_pid"]
    assert _pid_alive(pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    assert _wait_gone(pid, 60), f"vLLM (pid {pid}) or its workers outlived a SIGKILLed parent"
