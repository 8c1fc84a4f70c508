"""Data ablation: the power-law fit on synthetic points, its degenerate cases, nested subsets, and
`stillhouse ablate` end to end on the tiny base."""

from __future__ import annotations

import json

import numpy as np
import pytest

import stillhouse
from training.ablation import fit_power_law, nested_subsets, parse_fractions
from training.row import Row


def test_fit_recovers_known_parameters_and_extrapolates_inside_its_interval():
    n = np.array([50, 100, 250, 500, 750, 1000], dtype=float)
    truth = lambda x: 0.9 - 2.0 * x ** -0.6  # noqa: E731
    noisy = truth(n) + np.random.default_rng(0).normal(0, 0.002, len(n))
    fit = fit_power_law(n, noisy)
    assert fit.status == "ok" and fit.points == 6
    assert fit.a == pytest.approx(0.9, abs=0.01) and fit.c == pytest.approx(0.6, abs=0.05)
    low, high = fit.interval(2000)
    assert low < fit.predict(2000) < high
    assert low <= truth(2000) <= high


def test_exact_points_fit_exactly():
    n = np.array([10, 20, 40, 80, 160], dtype=float)
    fit = fit_power_law(n, 0.8 - 0.5 * n ** -0.5)
    assert fit.status == "ok"
    assert (fit.a, fit.b, fit.c) == pytest.approx((0.8, 0.5, 0.5), abs=1e-4)


@pytest.mark.parametrize(
    "sizes, scores, status",
    [
        ([10, 20, 40], [0.1, 0.2, 0.3], "too_few_points"),
        ([10, 10, 10, 10, 10], [0.1, 0.2, 0.3, 0.4, 0.5], "too_few_points"),
        ([10, 20, 40, 80], [0.5, 0.5, 0.5, 0.5], "flat"),
        ([10, 20, float("nan"), 80], [0.1, 0.2, 0.3, 0.4], "too_few_points"),
    ],
)
def test_degenerate_inputs_return_a_status_instead_of_raising(sizes, scores, status):
    fit = fit_power_law(sizes, scores)
    assert fit.status == status and fit.message
    if status == "flat":
        assert fit.predict(1000) == pytest.approx(0.5) and fit.interval(1000) is None


def test_any_fit_returns_a_known_status():
    for scores in ([0.0, 0.0, 0.0, 0.1], [0.9, 0.1, 0.9, 0.1], [1.0, 0.0, 0.0, 0.0]):
        assert fit_power_law([5, 10, 25, 50], scores).status in {"ok", "no_covariance", "fit_failed"}


def test_subsets_are_nested_and_deterministic():
    rows = [Row(id=f"r{i}", inputs={}) for i in range(40)]
    subsets = nested_subsets(rows, [5, 10, 25, 50, 100], seed=3)
    sizes = [len(subset) for subset in subsets.values()]
    assert sizes == [2, 4, 10, 20, 40]
    ordered = list(subsets.values())
    for small, large in zip(ordered, ordered[1:]):
        assert large[: len(small)] == small
    assert nested_subsets(list(reversed(rows)), [25], seed=3)[25] == subsets[25]
    assert nested_subsets(rows, [25], seed=4)[25] != subsets[25]
    assert parse_fractions("50,5,100") == [5, 50, 100]
    with pytest.raises(ValueError):
        parse_fractions("0,50")


def test_ablate_cli_writes_table_fit_and_plot(tmp_path, tiny_base_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["ablate", "--task", "demo", "--base", "tiny", "--name", "abl", "--fractions", "25,50,75,100", "--max-steps", "1",
            "--train-size", "40", "--test-size", "6", "--batch-size", "4", "--eval-limit", "3"]
    assert stillhouse.main(argv) == 0
    out_dir = tmp_path / "runs" / "abl" / "ablation"
    report = json.loads((out_dir / "ablation.json").read_text())
    rows = [point["rows"] for point in report["points"]]
    assert [point["fraction"] for point in report["points"]] == [25, 50, 75, 100] and rows == sorted(rows)
    assert all(point["test_rows"] == 3 and point["steps"] == 1 for point in report["points"])
    assert report["fit"]["status"] in {"ok", "flat", "no_covariance", "fit_failed"}
    assert report["extrapolation"]["rows"] == 2 * rows[-1]
    assert (out_dir / "ablation.svg").read_text().startswith("<svg")
    assert "| fraction % |" in (out_dir / "ablation.md").read_text()
    assert "Fit `accuracy(n)" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "abl" / "run.json").exists()  # ablation adapters are not registered


def test_ablate_refuses_a_non_servable_config_before_building_data(tmp_path, tiny_base_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert stillhouse.main(["ablate", "--task", "demo", "--base", "tiny", "--name", "bad", "--rank", "12", "--max-steps", "1"]) == 2
    assert not (tmp_path / "runs" / "bad" / "data").exists()


def test_adapters_are_scored_through_the_served_path_with_peft_greedy_outputs(tiny_base_dir, tmp_path):
    """The scratch server that scores ablation and sweep adapters answers what peft's greedy
    generate does, one prompt at a time, and the scores are those of those outputs."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.lora_factory import make_lora_adapter
    from training import trainer
    from training.evaluation import score
    from training.scratch_server import scratch_server
    from training.task import load_task

    demo = load_task("demo")
    task = demo.model_copy(update={"generation": demo.generation.model_copy(update={"max_new_tokens": 8})})
    adapter = make_lora_adapter(tiny_base_dir, tmp_path / "adapter", scale=0.2)
    reviews = ["Great phone.", "The hotel lobby smelled of smoke and the bed was broken.", "It arrived.", "Fine food, slow service, long wait for the bill."]
    rows = [Row(id=str(i), inputs={"review": text}, gold="positive") for i, text in enumerate(reviews)]

    def cut(text: str) -> str:
        for stop in task.generation.stop:
            text = text.split(stop)[0]
        return text

    tokenizer = trainer._tokenizer(str(tiny_base_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32), adapter).eval()
    one_by_one = []
    for row in rows:
        ids = tokenizer(task.student_prompt(row.inputs), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=task.generation.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        one_by_one.append(cut(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)))

    with scratch_server(tiny_base_dir) as server:
        report = server.score(task, rows, adapter)
    assert [cut(prediction["output"]) for prediction in report.predictions] == one_by_one
    assert all(one_by_one)  # every prompt got text, so the comparison means something
    assert report.failed_requests == 0 and report.metrics == score(task, [row.gold for row in rows], one_by_one)


def test_plateau_is_the_flat_tail_only():
    from training.ablation import plateau

    assert plateau([20, 40, 100, 200, 300, 400], [0.43, 0.53, 0.79, 0.79, 0.791, 0.79]) == {"from_rows": 100, "score": 0.79, "points": 4}
    assert plateau([20, 40, 100, 200], [0.4, 0.5, 0.6, 0.7]) is None
    assert plateau([10, 20, 30], [0.5, 0.9, 0.9]) is None  # two flat points are not yet a plateau
