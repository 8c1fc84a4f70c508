"""The whole pipeline on the tiny base: `stillhouse train` with no config file builds and curates the
demo data, trains a few steps, registers the adapter with lineage; the real server serves it
(greedy parity with peft) and `stillhouse eval` scores it and its teacher through lorax-client."""

from __future__ import annotations

import json

import lorax
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import stillhouse
from serving.registry import Registry
from training.task import load_task
from tests.serving.server_harness import running_server


def test_train_register_serve_and_evaluate(tmp_path, tiny_base_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    registry_dir = tmp_path / "registry"
    argv = ["train", "--task", "demo", "--base", "tiny", "--max-steps", "3", "--name", "demo-e2e", "--registry", str(registry_dir)]
    assert stillhouse.main([*argv, "--train-size", "40", "--test-size", "10", "--batch-size", "4"]) == 0

    run_dir = tmp_path / "runs" / "demo-e2e"
    card = json.loads((run_dir / "data" / "card.json").read_text())
    assert [step["step"] for step in card["steps"]] == ["rule_filter", "near_dedup", "split", "balance"]
    assert (run_dir / "data" / "card.md").is_file() and (run_dir / "train" / "loss.csv").is_file()
    entry = Registry(registry_dir).resolve("demo-e2e")
    lineage = entry.metadata["lineage"]
    assert lineage["task"] == "sentiment" and lineage["teacher"] == "gold labels"
    assert lineage["dataset_card"]["sha256"] == card["sha256"]
    assert lineage["config"]["train"]["max_steps"] == 3
    assert entry.metadata["metrics"]["train_steps"] == 3

    task = load_task("demo")
    test_rows = [json.loads(line) for line in (run_dir / "data" / "test.jsonl").read_text().splitlines()]
    prompt = task.student_prompt(test_rows[0]["inputs"])
    with running_server(tiny_base_dir, registry_dir) as (url, _):
        served = lorax.Client(url).generate(prompt, adapter_id="demo-e2e", max_new_tokens=4, details=True)
        assert [token.id for token in served.details.tokens] == peft_greedy(tiny_base_dir, entry.path, prompt, 4)

        assert stillhouse.main(["eval", "--name", "demo-e2e", "--url", url, "--with-teacher", "--limit", "6"]) == 0

    student = json.loads((run_dir / "eval" / "student.json").read_text())
    teacher = json.loads((run_dir / "eval" / "teacher.json").read_text())
    assert student["rows"] == teacher["rows"] == 6 and student["failed_requests"] == 0
    assert student["endpoint"].endswith("#demo-e2e@v1")
    assert teacher["mean_prompt_tokens"] > 5 * student["mean_prompt_tokens"]  # the point of context distillation
    accuracy = student["metrics"][0]
    assert accuracy["name"] == "accuracy" and accuracy["low"] <= accuracy["value"] <= accuracy["high"]
    assert "accuracy [95% CI]" in (run_dir / "eval" / "report.md").read_text()
    recorded = Registry(registry_dir).resolve("demo-e2e").metadata["metrics"]
    assert recorded["eval_accuracy"]["n"] == 6 and recorded["train_steps"] == 3


def peft_greedy(base_dir, adapter_dir, prompt: str, max_new_tokens: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()
