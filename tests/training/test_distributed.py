"""Data-parallel training on CPU: two processes under `torchrun` and under `accelerate launch`
train the adapter a single process trains on the same config, and register it once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from serving.loopback import free_port
from serving.registry import Registry
from training import distributed, recipe
from training.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {
    "task": "demo",
    "base": "tiny",
    "data.train_size": 48,
    "data.test_size": 8,
    "lora.dropout": 0.0,  # dropout masks are per rank; without dropout the ranks add up to one process exactly
    "train.max_steps": 6,
    "train.batch_size": 5,  # odd: the two ranks get unequal shares of each micro-batch
    "train.grad_accum": 2,
    "train.lr": 5e-3,
    "train.save_every": 3,
    "train.log_every": 3,
}
FLAGS = [
    "--task", "demo", "--base", "tiny", "--train-size", "48", "--test-size", "8", "--dropout", "0",
    "--max-steps", "6", "--batch-size", "5", "--grad-accum", "2", "--lr", "5e-3", "--save-every", "3", "--log-every", "3",
]  # fmt: skip


class Interrupt(Exception):
    pass


def test_each_rank_takes_every_world_th_row_of_a_micro_batch(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    shares = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        shares.append(distributed.shard([10, 11, 12, 13, 14]))
    assert shares == [[10, 12, 14], [11, 13]]
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert distributed.shard([10, 11]) == [10, 11] and distributed.is_main() and not distributed.init()


def test_accelerate_launch_cpu_starting_one_process_is_warned_about(monkeypatch):
    monkeypatch.setattr(distributed, "_warned", False)
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.warns(UserWarning, match="--multi_gpu"):
        assert not distributed.init()


@pytest.fixture(scope="module")
def single_adapter(tmp_path_factory, tiny_base_dir) -> dict[str, torch.Tensor]:
    """The adapter one process trains on SETTINGS, straight through."""
    result, _ = recipe.train(_config(tmp_path_factory.mktemp("single"), "single"), _quiet)
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert max(adapter[key].abs().max() for key in adapter if "lora_B" in key) > 1e-2  # it learned: the comparison means something
    return adapter


def test_torchrun_with_two_processes_trains_the_single_process_adapter_and_registers_it_once(tmp_path, single_adapter):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    output = _launch(torchrun + ["-m", "stillhouse", "train", "--name", "dp", *_flags(tmp_path)])
    assert output.stdout.split() == ["dp@v1"]  # the id, printed once (by rank 0)
    assert "on 2 processes" in output.stderr
    assert [entry.id for entry in Registry(tmp_path / "registry").list()] == ["dp@v1"]
    _assert_same_adapter(tmp_path / "runs" / "dp", single_adapter)


def test_accelerate_launch_resumes_a_single_process_checkpoint_on_two_processes(tmp_path, single_adapter):
    def stop_after_three(step):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        recipe.train(_config(tmp_path, "dp"), _quiet, on_step=stop_after_three)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]  # fmt: skip
    output = _launch(accelerate + ["-m", "stillhouse", "train", "--name", "dp", *_flags(tmp_path)])
    assert output.stdout.split() == ["dp@v1"]
    assert output.stderr.count("resuming from") == 1 and "(step 3)" in output.stderr and "on 2 processes" in output.stderr
    assert [entry.id for entry in Registry(tmp_path / "registry").list()] == ["dp@v1"]
    _assert_same_adapter(tmp_path / "runs" / "dp", single_adapter)


def _config(root: Path, name: str):
    return load_config(None, {**SETTINGS, "name": name, "runs_dir": str(root / "runs"), "registry": str(root / "registry")})


def _flags(root: Path) -> list[str]:
    return ["--runs-dir", str(root / "runs"), "--registry", str(root / "registry"), *FLAGS]


def _quiet(message: str) -> None:
    pass


def _assert_same_adapter(run_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    # Float summation order differs between one process and two, and Adam magnifies it where
    # gradients are near zero (up to ~1e-4 here); normalising each rank by its own completion
    # tokens instead of the global step's moves weights by ~2e-2.
    actual = load_file(run_dir / "train" / "adapter" / "adapter_model.safetensors")
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(actual[key], expected[key], rtol=0, atol=5e-4), (key, (actual[key] - expected[key]).abs().max())


def _launch(command: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; on a timeout kill the group (the launcher and its ranks)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command[2]} ran over {timeout} s:\n{stderr[-8000:]}")
    assert process.returncode == 0, f"{command[2]} exited {process.returncode}:\n{stderr[-8000:]}"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
