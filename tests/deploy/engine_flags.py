"""What a deployment must pass to vLLM, given the `stillhouse serve` flags in front of it."""

from __future__ import annotations

from serving import servability
from serving.engines.vllm_install import VLLM_VERSION
from serving.engines.vllm_process import VLLM_LORA_RANKS, max_lora_rank_for

VLLM_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"  # the release .venv-vllm pins


def flags(args: list[str]) -> dict[str, str]:
    """``--name=value`` (or a bare ``--name``) arguments as a dict."""
    return dict(arg[2:].partition("=")[::2] for arg in args if arg.startswith("--"))


def check_vllm_behind_server(vllm: dict[str, str], serve: dict[str, str], env: dict[str, str]) -> None:
    """vLLM's LoRA and size flags follow the server's flags and its servability profile."""
    ranks = servability.get_profile(serve["profile"]).ranks
    # The profile's largest rank, so no servable adapter is refused and none is padded further.
    assert int(vllm["max-lora-rank"]) == max_lora_rank_for([max(ranks)], ranks) == max(ranks) in VLLM_LORA_RANKS
    assert "enable-lora" in vllm and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert int(vllm["max-cpu-loras"]) >= int(vllm["max-loras"])
    assert vllm["max-cpu-loras"] == serve["max-active-adapters"]
    assert vllm["max-num-seqs"] == serve["max-queue"] and vllm["max-model-len"] == serve["max-total-tokens"]
    assert vllm["served-model-name"] == serve["base"] and vllm["model"].endswith("/models/" + serve["base"])
    assert serve["engine"] == "vllm" and serve["engine-url"].endswith(":" + vllm["port"])
