"""The torch and vLLM engines side by side on one workload, each behind our server, over HTTP.

Each engine is started as `stillhouse serve --engine ENGINE` on the same base, registry and
``--dtype``, one engine at a time so they never share the CPU. The registry holds 64 r=8 adapters
on all seven projections. First every adapter is loaded cold through ``/admin/adapters/load``
(the server's own timing: registry check, disk read, slot copy); then the load generator (this
process) streams LoRAX ``/generate_stream`` requests with ``ignore_eos_token``, so every request
yields exactly ``--max-new-tokens`` tokens, for the mixes: the base model, and 1, 4, 16 and 64
distinct adapters (each request's adapter drawn uniformly or by Zipf). Prints, per engine and
mix, output tok/s, p50/p99 latency, p50 time to first token, the server's peak RSS (its whole
process tree), and the ratios to the torch base row and to vLLM's same row. Never asserts a time.

    .venv/bin/python bench/engines.py [--requests 32] [--concurrency 16] [--max-new-tokens 32]
        [--prompt-tokens 0] [--choice uniform|zipf] [--dtype auto] [--engines torch vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from serving import base_models
from serving.engines.precision import DTYPES
from serving.engines.vllm_install import DEFAULT_VENV, venv_python
from serving.loopback import free_port
from serving.registry import Registry
from training.config import SEVEN_PROJECTIONS

ADMIN = "bench-admin"
ADAPTER_COUNT = 64
ADAPTERS = tuple(f"bench-{i:02d}" for i in range(ADAPTER_COUNT))
MIXES = {"base": (None,), "1 adapter": ADAPTERS[:1], "4 mixed": ADAPTERS[:4], "16 mixed": ADAPTERS[:16], "64 mixed": ADAPTERS}
PROMPTS = [
    "The capital of France is",
    "Review: Lovely view and kind hosts.\nSentiment:",
    "Once upon a time, in a small village,",
    "Here is a list of fruits: apple, banana,",
]


@contextmanager
def serve(engine: str, base_dir: Path, registry_dir: Path, args, timeout_s: float = 900):
    """`stillhouse serve --engine ENGINE` on a free port; yields its URL and process once healthy."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix=f"bench-serve-{engine}-", suffix=".log", delete=False)
    command = [
        sys.executable, "-m", "stillhouse", "serve", "--engine", engine, "--base", str(base_dir),
        "--registry", str(registry_dir), "--port", str(port), "--max-queue", "256", "--max-total-tokens", "2048",
        "--dtype", args.dtype, "--max-resident-adapters", str(args.active_adapters), "--admin-token", ADMIN,
    ]  # fmt: skip
    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            if child.poll() is not None:
                raise RuntimeError(f"{engine} server exited:\n{Path(log.name).read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"{engine} server did not start:\n{Path(log.name).read_text()[-3000:]}")
            time.sleep(1)
        print(f"{engine}: ready in {time.monotonic() - started:.0f} s (log {log.name})", file=sys.stderr)
        yield url, psutil.Process(child.pid)
    finally:
        child.terminate()
        child.wait(timeout=120)


def write_adapters(base_dir: Path, out_dir: Path, names: tuple[str, ...]) -> list[Path]:
    """r=8 LoRAs on all seven projections with random (not zero) weights, one seed each."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=list(SEVEN_PROJECTIONS), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    paths = []
    for seed, name in enumerate(names, start=1):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in peft_model.named_parameters():
                if "lora_" in key:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        peft_model.save_pretrained(out_dir / name)
        paths.append(out_dir / name)
    return paths


class PeakRss:
    """The largest resident set of a process and its children, sampled while the block runs."""

    def __init__(self, process: psutil.Process, every_s: float = 0.1):
        self._process, self._every_s = process, every_s
        self.peak = 0
        self._stop = threading.Event()

    def _tree_rss(self) -> int:
        total = 0
        for p in [self._process, *self._process.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._tree_rss())
            self._stop.wait(self._every_s)

    def __enter__(self) -> PeakRss:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def choose_adapters(adapters: tuple, requests: int, choice: str, seed: int = 0) -> list:
    """Each request's adapter: uniform or Zipf(1) over ``adapters``, seeded so every engine gets the same list."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) for k in range(len(adapters))] if choice == "zipf" else None
    return rng.choices(adapters, weights=weights, k=requests)


async def run_mix(url: str, chosen: list, prompts: list[str], concurrency: int, max_new_tokens: int) -> dict:
    """Stream the requests, ``concurrency`` at a time; tok/s, latency and TTFT percentiles."""
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    first_tokens: list[float] = []
    tokens = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        parameters = {"max_new_tokens": max_new_tokens, "ignore_eos_token": True}
        if chosen[i]:
            parameters["adapter_id"] = chosen[i]
        body = {"inputs": prompts[i % len(prompts)], "parameters": parameters}
        async with semaphore:
            started = time.perf_counter()
            first = None
            async with client.stream("POST", f"{url}/generate_stream", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data:") and "token" in json.loads(line[5:]):
                        first = first or time.perf_counter()
                        tokens += 1
            latencies.append(time.perf_counter() - started)
            first_tokens.append((first or time.perf_counter()) - started)

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(len(chosen))))
        wall = time.perf_counter() - started
    return {
        "tok_s": tokens / wall,
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
        "ttft": statistics.median(first_tokens),
    }


def cold_loads(url: str) -> list[float]:
    """Load every adapter through the admin API; the server-side seconds of each."""
    seconds = []
    with httpx.Client(timeout=None, headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        for name in ADAPTERS:
            response = client.post(f"{url}/admin/adapters/load", json={"adapter_id": name})
            response.raise_for_status()
            seconds.append(response.json()["seconds"])
    return seconds


def bench_engine(engine: str, base_dir: Path, registry_dir: Path, prompts: list[str], args) -> dict:
    with serve(engine, base_dir, registry_dir, args) as (url, process):
        loads = cold_loads(url)
        # warm-up: run each code path once, outside the measurement
        asyncio.run(run_mix(url, [None, *ADAPTERS[:4]], prompts, 5, 2))
        results: dict = {"cold_load_p50": statistics.median(loads)}
        for mix, adapters in MIXES.items():
            chosen = choose_adapters(adapters, args.requests, args.choice)
            with PeakRss(process) as rss:
                results[mix] = asyncio.run(run_mix(url, chosen, prompts, args.concurrency, args.max_new_tokens))
            results[mix]["rss_mb"] = rss.peak / 2**20
            print(f"{engine} {mix}: {results[mix]['tok_s']:.1f} tok/s", file=sys.stderr)
        return results


def long_prompts(base_dir: Path, tokens: int) -> list[str]:
    """The prompts, each repeated until it is about ``tokens`` tokens long (0: as they are)."""
    if not tokens:
        return PROMPTS
    tokenizer = base_models.load_tokenizer(base_dir)
    out = []
    for prompt in PROMPTS:
        text = prompt
        while len(tokenizer.encode(text)) < tokens:
            text = f"{prompt} {text}"
        out.append(text)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="gemma-3-270m")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=0, help="stretch every prompt to about this many tokens")
    parser.add_argument("--choice", choices=["uniform", "zipf"], default="uniform", help="how each request's adapter is drawn")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="both engines' dtype")
    parser.add_argument("--active-adapters", type=int, default=32, help="--max-resident-adapters of the servers")
    parser.add_argument("--engines", nargs="+", default=["torch", "vllm"], choices=["torch", "vllm"])
    args = parser.parse_args()

    base_dir = base_models.provision(args.base)
    prompts = long_prompts(base_dir, args.prompt_tokens)
    engines = [e for e in args.engines if e != "vllm" or venv_python(DEFAULT_VENV).exists()]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch:
        registry_dir = Path(scratch) / "registry"
        registry = Registry(registry_dir)
        for name, source in zip(ADAPTERS, write_adapters(base_dir, Path(scratch) / "adapters", ADAPTERS)):
            registry.add(source, name, base_dir=base_dir)
        results = {engine: bench_engine(engine, base_dir, registry_dir, prompts, args) for engine in engines}

    print(
        f"\n{args.base}, --dtype {args.dtype}, {args.requests} requests x {args.max_new_tokens} new tokens, "
        f"concurrency {args.concurrency}, {args.choice} adapter choice, {args.active_adapters} adapter slots, "
        "LoRAX /generate_stream through `stillhouse serve`"
    )
    print(f"{'engine':<7} {'mix':<10} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} {'TTFT s':>7} {'RSS MB':>7} {'/base':>6} {'/vLLM':>6}")
    base = results["torch"]["base"]["tok_s"] if "torch" in results else None
    for engine in args.engines:
        if engine not in results:
            print(f"{engine:<7} skipped: no {DEFAULT_VENV.name} (run `make vllm`)")
            continue
        for mix in MIXES:
            r = results[engine][mix]
            to_base = f"{r['tok_s'] / base:>5.2f}x" if base else f"{'-':>6}"
            vllm = results.get("vllm", {}).get(mix)
            to_vllm = f"{r['tok_s'] / vllm['tok_s']:>5.2f}x" if vllm else f"{'-':>6}"
            print(
                f"{engine:<7} {mix:<10} {r['tok_s']:>7.1f} {r['p50']:>7.2f} {r['p99']:>7.2f} {r['ttft']:>7.2f} "
                f"{r['rss_mb']:>7.0f} {to_base} {to_vllm}"
            )
    for engine in results:
        print(f"{engine}: adapter cold load p50 {results[engine]['cold_load_p50'] * 1000:.0f} ms ({ADAPTER_COUNT} adapters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
