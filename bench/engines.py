"""The torch and vLLM engines side by side on one workload, each behind our server, over HTTP.

Each engine is started as `stillhouse serve --engine ENGINE` on the same base and registry (four
r=8 adapters on all seven projections), one engine at a time so they never share the CPU. The
load generator (this process) sends LoRAX ``/generate`` requests with ``ignore_eos_token`` so
every request yields exactly ``--max-new-tokens`` tokens, for three mixes: the base model, one
adapter, four adapters round-robin. Prints output tok/s and p50/p99 latency per engine with the
vLLM/torch ratios. Never asserts a time.

    .venv/bin/python bench/engines.py [--requests 16] [--concurrency 8] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from serving import base_models
from serving.loopback import free_port
from serving.registry import Registry
from training.config import SEVEN_PROJECTIONS

ADAPTERS = ("bench-a", "bench-b", "bench-c", "bench-d")
MIXES = {"base": (None,), "1 adapter": ADAPTERS[:1], "4 mixed": ADAPTERS}
PROMPTS = [
    "The capital of France is",
    "Review: Lovely view and kind hosts.\nSentiment:",
    "Once upon a time, in a small village,",
    "Here is a list of fruits: apple, banana,",
]


@contextmanager
def serve(engine: str, base_dir: Path, registry_dir: Path, timeout_s: float = 900):
    """`stillhouse serve --engine ENGINE` on a free port; yields its URL once healthy."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix=f"bench-serve-{engine}-", suffix=".log", delete=False)
    command = [
        sys.executable, "-m", "stillhouse", "serve", "--engine", engine, "--base", str(base_dir),
        "--registry", str(registry_dir), "--port", str(port), "--max-queue", "256", "--max-total-tokens", "2048",
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
        print(f"{engine}: ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield url
    finally:
        child.terminate()
        child.wait(timeout=120)


def write_adapter(base_dir: Path, out_dir: Path, seed: int) -> Path:
    """An r=8 LoRA on all seven projections with random (not zero) weights, so it changes the output."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=SEVEN_PROJECTIONS, task_type="CAUSAL_LM", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


async def run_mix(url: str, adapters: tuple, requests: int, concurrency: int, max_new_tokens: int) -> dict:
    """Send ``requests`` generations, ``concurrency`` at a time; tok/s and latency percentiles."""
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        parameters = {"max_new_tokens": max_new_tokens, "ignore_eos_token": True}
        if adapters[i % len(adapters)]:
            parameters["adapter_id"] = adapters[i % len(adapters)]
        async with semaphore:
            started = time.perf_counter()
            response = await client.post(f"{url}/generate", json={"inputs": PROMPTS[i % len(PROMPTS)], "parameters": parameters})
            latencies.append(time.perf_counter() - started)
        response.raise_for_status()
        tokens += response.json()["details"]["generated_tokens"]

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(requests)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "tok_s": tokens / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def bench_engine(engine: str, base_dir: Path, registry_dir: Path, args) -> dict[str, dict]:
    with serve(engine, base_dir, registry_dir) as url:
        # warm-up: load every adapter and run each code path once, outside the measurement
        asyncio.run(run_mix(url, (None, *ADAPTERS), 5, 5, 2))
        results = {}
        for mix, adapters in MIXES.items():
            results[mix] = asyncio.run(run_mix(url, adapters, args.requests, args.concurrency, args.max_new_tokens))
            print(f"{engine} {mix}: {results[mix]['tok_s']:.1f} tok/s", file=sys.stderr)
        return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="gemma-3-270m")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--engines", nargs="+", default=["torch", "vllm"], choices=["torch", "vllm"])
    args = parser.parse_args()

    base_dir = base_models.provision(args.base)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch:
        registry_dir = Path(scratch) / "registry"
        registry = Registry(registry_dir)
        for seed, name in enumerate(ADAPTERS, start=1):
            source = write_adapter(base_dir, Path(scratch) / name, seed)
            registry.add(source, name, base_dir=base_dir)
        results = {engine: bench_engine(engine, base_dir, registry_dir, args) for engine in args.engines}

    print(
        f"\n{args.base}, {args.requests} requests x {args.max_new_tokens} new tokens, concurrency {args.concurrency}, "
        "LoRAX /generate through `stillhouse serve`"
    )
    header = f"{'mix':<10}" + "".join(f" {e + ' tok/s':>12} {e + ' p50 s':>11} {e + ' p99 s':>11}" for e in args.engines)
    if len(args.engines) == 2:
        header += f" {'tok/s ratio':>11} {'p50 ratio':>9}"
    print(header)
    for mix in MIXES:
        row = f"{mix:<10}"
        for engine in args.engines:
            r = results[engine][mix]
            row += f" {r['tok_s']:>12.1f} {r['p50']:>11.2f} {r['p99']:>11.2f}"
        if len(args.engines) == 2:
            a, b = (results[e][mix] for e in args.engines)
            row += f" {b['tok_s'] / a['tok_s']:>10.2f}x {b['p50'] / a['p50']:>8.2f}x"
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
