"""The torch, PEFT and vLLM engines side by side on one workload, each behind our server, over HTTP.

Each engine is started as `stillhouse serve --engine ENGINE` on the same base, registry and
``--dtype``, one engine at a time so they never share the CPU. The registry holds 64 r=8 adapters
on all seven projections (and, for the ``1000`` row, 936 more names). First every one of the 64 is
loaded cold through ``/admin/adapters/load`` (the server's own timing: registry check, disk read,
slot copy); then the load generator (this process) streams LoRAX ``/generate_stream`` requests
with ``ignore_eos_token``, so every request yields exactly ``--max-new-tokens`` tokens, for the
rows (``--rows``):

    base   the base model                      (torch, peft, vllm)
    1      one adapter                         (torch, peft, vllm)
    4, 16  4 or 16 distinct adapters mixed     (torch, peft, vllm)
    64     64 distinct adapters mixed          (torch, vllm)
    1000   1,000 registered, --max-active-adapters 32, drawn among all 1,000   (torch)

each request's adapter drawn uniformly or by Zipf. ``peft`` is the baseline engine: HF
``generate`` with peft's mixed-adapter batches. ``--cpu-load N`` then runs the torch ``base`` and
``16`` rows again while N busy-looping processes compete for the CPU. Prints, per engine and row,
output tok/s, p50/p99 latency, p50 time to first token, the server's peak RSS (its whole process
tree), and the ratios to the torch base row and to vLLM's same row; the footer gives the ratios
the targets speak of. Never asserts a time.

    .venv/bin/python bench/engines.py [--base gemma-3-270m|tiny] [--requests 32] [--concurrency 16]
        [--max-new-tokens 32] [--prompt-tokens 0] [--choice uniform|zipf] [--dtype auto]
        [--engines torch peft vllm] [--rows base 1 4 16 64 1000] [--cpu-load N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from serving.servability import WEIGHTS_FILE
from training.config import SEVEN_PROJECTIONS

ADMIN = "bench-admin"
ADAPTER_COUNT = 64
ADAPTERS = tuple(f"bench-{i:02d}" for i in range(ADAPTER_COUNT))
REGISTERED = tuple(f"bench-{i:04d}" for i in range(ADAPTER_COUNT, 1000))  # the 1000 row's other names
#: row key -> (label, the adapters its requests draw from)
ROWS = {
    "base": ("base", (None,)),
    "1": ("1 adapter", ADAPTERS[:1]),
    "4": ("4 mixed", ADAPTERS[:4]),
    "16": ("16 mixed", ADAPTERS[:16]),
    "64": ("64 mixed", ADAPTERS),
    "1000": ("1000 registered", ADAPTERS + REGISTERED),  # with --active-adapters slots
}
#: the PEFT baseline runs the rows its target compares (each takes minutes in bfloat16)
ENGINE_ROWS = {"torch": tuple(ROWS), "peft": ("base", "16"), "vllm": ("base", "1", "4", "16", "64")}
LOADED_ROWS = ("base", "16")  # what --cpu-load runs again, on the torch engine
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
        "--dtype", args.dtype, "--max-active-adapters", str(args.active_adapters), "--admin-token", ADMIN,
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


def register_many(registry: Registry, sources: list[Path], base_dir: Path, names: tuple[str, ...]) -> None:
    """Register ``names``, each with the weights of one of ``sources``, hard-linked so 1,000 adapters cost one copy on disk.

    The registry copies regular files (links are not followed out of an adapter), so each copy
    is swapped for a hard link to its identical source right after ``add``.
    """
    for i, name in enumerate(names):
        source = sources[i % len(sources)] / WEIGHTS_FILE
        stored = registry.add(source.parent, name, base_dir=base_dir).path / WEIGHTS_FILE
        link = stored.with_name(f".{WEIGHTS_FILE}.link")
        os.link(source, link)
        os.replace(link, stored)


@contextmanager
def busy_cpus(n: int):
    """``n`` processes spinning on the CPU while the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


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


def measure(url: str, process: psutil.Process, key: str, prompts: list[str], args) -> dict:
    """One row: its requests' adapters drawn, streamed, timed, with the server's peak RSS."""
    chosen = choose_adapters(ROWS[key][1], args.requests, args.choice)
    with PeakRss(process) as rss:
        result = asyncio.run(run_mix(url, chosen, prompts, args.concurrency, args.max_new_tokens))
    return {**result, "rss_mb": rss.peak / 2**20}


def bench_engine(engine: str, base_dir: Path, registry_dir: Path, prompts: list[str], args) -> dict:
    with serve(engine, base_dir, registry_dir, args) as (url, process):
        loads = cold_loads(url)
        # warm-up: run each code path once, outside the measurement
        asyncio.run(run_mix(url, [None, *ADAPTERS[:4]], prompts, 5, 2))
        results: dict = {"cold_load_p50": statistics.median(loads)}
        for key in [k for k in ENGINE_ROWS[engine] if k in args.rows]:
            results[key] = measure(url, process, key, prompts, args)
            print(f"{engine} {ROWS[key][0]}: {results[key]['tok_s']:.1f} tok/s", file=sys.stderr)
        if engine == "torch" and args.cpu_load:
            with busy_cpus(args.cpu_load):
                for key in [k for k in LOADED_ROWS if k in args.rows]:
                    results[f"{key} loaded"] = measure(url, process, key, prompts, args)
                    print(f"{engine} {ROWS[key][0]}, {args.cpu_load} busy: {results[f'{key} loaded']['tok_s']:.1f} tok/s", file=sys.stderr)
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


def ratio(numerator: dict | None, denominator: dict | None) -> str:
    """``numerator / denominator`` tok/s as ``1.23x``, or ``-`` when either row is missing."""
    if not numerator or not denominator:
        return f"{'-':>6}"
    return f"{numerator['tok_s'] / denominator['tok_s']:>5.2f}x"


def report(results: dict, args) -> None:
    """The table, then the ratios the targets speak of."""
    print(
        f"\n{args.base}, --dtype {args.dtype}, {args.requests} requests x {args.max_new_tokens} new tokens, "
        f"concurrency {args.concurrency}, {args.choice} adapter choice, {args.active_adapters} adapter slots, "
        "LoRAX /generate_stream through `stillhouse serve`"
    )
    print(f"{'engine':<7} {'row':<22} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} {'TTFT s':>7} {'RSS MB':>7} {'/base':>6} {'/vLLM':>6}")
    torch_rows = results.get("torch", {})
    for engine in args.engines:
        if engine not in results:
            print(f"{engine:<7} skipped: no {DEFAULT_VENV.name} (run `make vllm`)")
            continue
        keys = [k for k in ENGINE_ROWS[engine] if k in args.rows]
        keys += [f"{k} loaded" for k in LOADED_ROWS if f"{k} loaded" in results[engine]]
        for key in keys:
            r = results[engine][key]
            row = key.removesuffix(" loaded")
            label = ROWS[row][0] + (f", {args.cpu_load} busy" if key.endswith(" loaded") else "")
            vllm = results.get("vllm", {}).get(key)
            print(
                f"{engine:<7} {label:<22} {r['tok_s']:>7.1f} {r['p50']:>7.2f} {r['p99']:>7.2f} {r['ttft']:>7.2f} "
                f"{r['rss_mb']:>7.0f} {ratio(r, torch_rows.get('base'))} {ratio(r, vllm)}"
            )
    for engine in results:
        print(f"{engine}: adapter cold load p50 {results[engine]['cold_load_p50'] * 1000:.0f} ms ({ADAPTER_COUNT} adapters)")
    peft_rows = results.get("peft", {})
    if "16" in torch_rows and "16" in peft_rows:
        print(f"torch 16 mixed / peft 16 mixed: {ratio(torch_rows['16'], peft_rows['16']).strip()} (target >= 5x)")
    if "1000" in torch_rows and "4" in torch_rows:
        print(f"torch 1000 registered, 32 active / torch 4 mixed: {ratio(torch_rows['1000'], torch_rows['4']).strip()} (target >= 0.8x)")
    cores = len(os.sched_getaffinity(0))
    for key in LOADED_ROWS:
        if f"{key} loaded" in torch_rows:
            print(
                f"torch {ROWS[key][0]} with {args.cpu_load} busy processes / without: "
                f"{ratio(torch_rows[f'{key} loaded'], torch_rows[key]).strip()} "
                f"(a fair share of {cores} cores is {cores / (cores + args.cpu_load):.2f}x)"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="gemma-3-270m", help="gemma-3-270m (default), tiny, or a local HF model directory")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=0, help="stretch every prompt to about this many tokens")
    parser.add_argument("--choice", choices=["uniform", "zipf"], default="uniform", help="how each request's adapter is drawn")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="every engine's dtype")
    parser.add_argument("--active-adapters", type=int, default=32, help="--max-active-adapters of the servers")
    parser.add_argument("--engines", nargs="+", default=["torch", "peft", "vllm"], choices=list(ENGINE_ROWS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="run only these rows")
    parser.add_argument("--cpu-load", type=int, default=0, metavar="N", help="run the torch base and 16 rows again beside N busy processes")
    args = parser.parse_args()

    base_dir = base_models.provision(args.base)
    prompts = long_prompts(base_dir, args.prompt_tokens)
    engines = [e for e in args.engines if e != "vllm" or venv_python(DEFAULT_VENV).exists()]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as scratch:
        registry_dir = Path(scratch) / "registry"
        registry = Registry(registry_dir)
        sources = write_adapters(base_dir, Path(scratch) / "adapters", ADAPTERS)
        for name, source in zip(ADAPTERS, sources):
            registry.add(source, name, base_dir=base_dir)
        if "1000" in args.rows and "torch" in engines:
            started = time.monotonic()
            register_many(registry, sources, base_dir, REGISTERED)
            print(f"registered {len(ADAPTERS) + len(REGISTERED)} adapters in {time.monotonic() - started:.0f} s", file=sys.stderr)
        results = {engine: bench_engine(engine, base_dir, registry_dir, prompts, args) for engine in engines}
    report(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
