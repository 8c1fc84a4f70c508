"""A vLLM OpenAI server run as our child process, and the launch flags chosen for it.

``VllmProcess`` launches ``python -m vllm.entrypoints.openai.api_server`` from ``.venv-vllm``
on a free loopback port and makes sure it dies with us: its own process group (killed on
``terminate`` and at exit) and ``PR_SET_PDEATHSIG`` (the kernel sends it SIGTERM when this
process dies, SIGKILL included). It knows nothing of generation: ``VllmEngine`` talks to it.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import httpx

from serving.engines.base import DEFAULT_MAX_TOTAL_TOKENS
from serving.engines.vllm_install import DEFAULT_VENV, venv_python
from serving.errors import GenerationError
from serving.loopback import LOOPBACK, free_port

# Values vLLM's --max-lora-rank accepts.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM's own default; a larger max rank costs every LoRA slot memory and time (vLLM PR #22782).
MIN_MAX_LORA_RANK = 16
LOG_TAIL_LINES = 30
_PR_SET_PDEATHSIG = 1


def max_lora_rank_for(ranks: list[int], profile_ranks: frozenset[int] | None = None) -> int:
    """The --max-lora-rank to launch vLLM with: the smallest vLLM value covering the adapters in use.

    At least ``MIN_MAX_LORA_RANK``; never above the profile's largest rank (64 for strict), since
    adapters above it are refused before they reach vLLM.
    """
    needed = max([MIN_MAX_LORA_RANK, *ranks])
    if profile_ranks:
        needed = min(needed, max(max(profile_ranks), MIN_MAX_LORA_RANK))
    return next((r for r in VLLM_LORA_RANKS if r >= needed), VLLM_LORA_RANKS[-1])


def _die_with_parent() -> None:
    """In the child before exec: own process group, and SIGTERM when the parent dies."""
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class VllmProcess:
    """A vLLM OpenAI server running as our child on a loopback port."""

    def __init__(
        self,
        base_dir: Path,
        served_name: str,
        *,
        venv: Path = DEFAULT_VENV,
        dtype: str = "float32",
        max_model_len: int = DEFAULT_MAX_TOTAL_TOKENS,
        max_lora_rank: int = MIN_MAX_LORA_RANK,
        max_loras: int = 4,
        max_cpu_loras: int = 8,
        max_num_seqs: int = 64,
        cpu: bool = True,
        kv_cache_gib: int = 2,
        extra_args: tuple[str, ...] = (),
    ):
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        python = venv_python(venv)
        if not python.exists():
            raise GenerationError(f"no vLLM venv at {venv}: run `stillhouse engines install vllm` (or `make vllm`)")
        self.command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(base_dir),
            "--served-model-name", served_name,
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--dtype", dtype,
            "--max-model-len", str(max_model_len),
            "--max-num-seqs", str(max_num_seqs),
            "--enable-lora",
            "--max-lora-rank", str(max_lora_rank),
            "--max-loras", str(max_loras),
            "--max-cpu-loras", str(max(max_cpu_loras, max_loras)),
            "--generation-config", "auto",
            "--uvicorn-log-level", "warning",
            *(["--gpu-memory-utilization", "0.4"] if cpu else []),
            *extra_args,
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib)),
            "PYTHONUNBUFFERED": "1",
        }
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id (also its process group's), None before launch or after terminate."""
        return self.process.pid if self.process else None

    def launch(self) -> None:
        """Start the child (call from a long-lived thread: PDEATHSIG follows the thread that forks)."""
        fd, name = tempfile.mkstemp(prefix="stillhouse-vllm-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=self.env, preexec_fn=_die_with_parent,
            )  # fmt: skip
        _LIVE.add(self)
        print(f"vllm: pid {self.process.pid} starting on {self.url} (log {self.log_path})", file=sys.stderr, flush=True)

    async def wait_healthy(self, timeout_s: float) -> None:
        """Poll /health until it answers 200; on timeout or exit, raise with the child's last log lines."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=5) as client:
            while True:
                if self.process.poll() is not None:
                    raise GenerationError(
                        f"the vLLM server exited with code {self.process.returncode} while starting:\n{self.log_tail()}"
                    )
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.terminate()
                    raise GenerationError(f"the vLLM server was not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")
                await asyncio.sleep(0.5)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines the child wrote (stdout and stderr)."""
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def terminate(self, grace_s: float = 20) -> None:
        """Stop the child and everything it started (its process group): SIGTERM, then SIGKILL."""
        process, self.process = self.process, None
        _LIVE.discard(self)
        if process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace_s)
                # the group may outlive its leader: make sure the engine-core workers go too
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break
        if process.poll() is None:
            process.wait(timeout=5)


_LIVE: weakref.WeakSet[VllmProcess] = weakref.WeakSet()


@atexit.register
def _terminate_children() -> None:
    for process in list(_LIVE):
        process.terminate(grace_s=10)
