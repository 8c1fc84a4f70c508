"""`stillhouse teacher compare` end to end: variants against the real tiny server and a stand-in teacher
on loopback, the cache (a re-run asks nothing), the report, and `--apply` feeding `stillhouse label`."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import stillhouse
from monitoring import catalog
from tests.serving.server_harness import running_server, serving_in_thread
from tests.training.teacher_upstream import StandInTeacher
from training import recipe
from training.config import load_config
from training.task import load_task

TASK = load_task("demo")
LABELS = list(TASK.output.labels)

VARIANTS = """\
variants:
  - {name: constrained, constrain: true}
  - {name: pool-6, shots: 6}
  - {name: balanced-6, base: pool-6, selection: balanced}
  - {name: fixed-3, base: pool-6, shots: 3}
  - {name: nearest-3, base: fixed-3, selection: nearest}
  - {name: instructed, instruction: "Answer positive, negative or neutral."}
  - {name: votes-3, votes: 3, vote_temperature: 0.9}
"""


def build_run(name: str, train: int = 60, test: int = 30):
    config = load_config(None, {"name": name, "base": "tiny", "data.train_size": train, "data.test_size": test, "data.use_gold_as_output": False})
    recipe.build(config, TASK, lambda _: None)
    return config


@pytest.fixture
def stand_in():
    teacher = StandInTeacher()
    with serving_in_thread(teacher.app()) as url:
        yield teacher, url


@pytest.mark.parametrize("protocol", ["lorax", "openai"])
def test_compare_marks_the_constrained_variant_and_apply_feeds_labelling(stand_in, tmp_path, monkeypatch, capsys, protocol):
    teacher, url = stand_in
    monkeypatch.chdir(tmp_path)
    build_run("tc")
    (tmp_path / "variants.yaml").write_text(VARIANTS)
    teacher_url = url if protocol == "lorax" else f"{url}/v1"
    command = ["teacher", "compare", "--name", "tc", "--teacher-url", teacher_url, "--teacher-protocol", protocol, "--variants", "variants.yaml"]
    assert stillhouse.main(command) == 0
    out_dir = tmp_path / "runs" / "tc" / "teacher"
    report = json.loads((out_dir / "compare.json").read_text())
    by_name = {variant["name"]: variant for variant in report["variants"]}
    assert list(by_name) == ["current", "constrained", "pool-6", "balanced-6", "fixed-3", "nearest-3", "instructed", "votes-3"]
    assert report["rows"] == 30 and report["best"] == "constrained"
    # the current teacher never says neutral, and the report says so; the constraint fixes it
    assert by_name["current"]["never_answers"] == ["neutral"] and by_name["current"]["recall"]["neutral"]["value"] == 0
    assert by_name["constrained"]["never_answers"] == [] and by_name["constrained"]["recall"]["neutral"]["value"] == 1
    test = by_name["constrained"]["mcnemar"]
    assert test["only_current_right"] == 0 and test["only_variant_right"] == by_name["current"]["recall"]["neutral"]["n"]
    assert test["p_value"] < 0.05 and "mcnemar" not in by_name["current"]
    accuracy = {m["name"]: m for m in by_name["constrained"]["metrics"]}["accuracy"]
    assert accuracy["value"] == 1 and accuracy["low"] < 1 and accuracy["n"] == 30
    assert by_name["votes-3"]["requested"] == 90 and by_name["votes-3"]["requests_per_s"] > 0
    assert by_name["pool-6"]["prompt_tokens"] > by_name["fixed-3"]["prompt_tokens"]
    markdown = (out_dir / "compare.md").read_text()
    assert "constrained ★" in markdown and "never answered" in markdown and "shots=3" in markdown
    assert (out_dir / "compare.html").read_text().count("<svg") == 3

    # what was sent: the constraint on the constrained variant's requests only, in each protocol's field
    prompt_key = "inputs" if protocol == "lorax" else "prompt"
    if protocol == "openai":
        constrained = [body for body in teacher.bodies if "guided_choice" in body]
        assert constrained and all(body["guided_choice"] == LABELS for body in constrained)
    else:
        constrained = [body for body in teacher.bodies if body["parameters"].get("response_format")]
        schema = constrained[0]["parameters"]["response_format"]
        assert schema["type"] == "json_object" and schema["schema"]["properties"]["label"]["enum"] == LABELS
    assert len(constrained) == 30
    prompts = [body[prompt_key] for body in teacher.bodies]
    balanced = [p for p in prompts if p.count("\n\n") == 6 and "Answer" not in p]
    assert any(all(f"Sentiment: {label}" in p for label in LABELS) for p in balanced)
    assert len({p.split("\n\n")[0] for p in prompts if p.count("\n\n") == 3}) > 1  # nearest shots differ per row

    # a re-run asks nothing twice
    asked = teacher.requests
    assert stillhouse.main(command) == 0
    assert teacher.requests == asked
    again = json.loads((out_dir / "compare.json").read_text())
    assert all(variant["requested"] == 0 for variant in again["variants"])
    assert [v["metrics"] for v in again["variants"]] == [v["metrics"] for v in report["variants"]]
    assert stillhouse.main([*command, "--apply"]) == 0
    assert teacher.requests == asked

    # --apply wrote the variant into the run config; `stillhouse label` asks with it and the rows name it
    saved = json.loads((tmp_path / "runs" / "tc" / "config.json").read_text())
    assert saved["teacher_variant"]["name"] == "constrained" and saved["teacher_variant"]["constrain"] is True
    capsys.readouterr()
    assert stillhouse.main(["label", "--name", "tc", "--relabel"]) == 0
    assert "teacher variant constrained" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "runs" / "tc" / "data" / "rows.jsonl").read_text().splitlines()]
    assert all(row["teacher"].endswith("(teacher variant constrained)") for row in rows)
    assert all(row["output"] in LABELS for row in rows) and any(row["output"] == "neutral" for row in rows)
    assert stillhouse.main(["data", "curate", "--name", "tc"]) == 0
    card = json.loads((tmp_path / "runs" / "tc" / "data" / "card.json").read_text())
    assert "teacher variant constrained" in card["teacher"]  # the registry lineage records the card's teacher

    # `stillhouse eval --with-teacher` scores the teacher as it labelled: the applied variant, from the labelling cache
    asked = teacher.requests
    assert stillhouse.main(["eval", "--name", "tc", "--url", teacher_url, "--protocol", protocol, "--with-teacher"]) == 0
    tested = len((tmp_path / "runs" / "tc" / "data" / "test.jsonl").read_text().splitlines())
    assert teacher.requests == asked + tested  # the student's prompts only
    scored = json.loads((tmp_path / "runs" / "tc" / "eval" / "teacher.json").read_text())
    assert scored["endpoint"].endswith("(teacher variant constrained)")
    assert {m["name"]: m for m in scored["metrics"]}["accuracy"]["value"] == 1


def server_requests(url: str) -> float:
    """Finished requests the server counted (every adapter and outcome)."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == catalog.SERVER_REQUESTS.name:
                total += sample.value
    return total


@pytest.mark.parametrize("protocol", ["lorax", "openai"])
def test_compare_against_the_real_server_caches_every_answer(tiny_base_dir, tmp_path_factory, tmp_path, monkeypatch, protocol):
    monkeypatch.chdir(tmp_path)
    build_run("real", train=30, test=12)
    with running_server(tiny_base_dir, tmp_path_factory.mktemp("registry")) as (url, _):
        teacher_url = url if protocol == "lorax" else f"{url}/v1"
        command = ["teacher", "compare", "--name", "real", "--teacher-url", teacher_url, "--teacher-protocol", protocol, "--limit", "6",
                   "--variant", "shots=2", "--variant", "temperature=0.8", "--variant", "votes=2",
                   "--variant", "instruction=Classify the sentiment of the review."]
        assert stillhouse.main(command) == 0
        first = server_requests(url)
        assert first == 6 * (1 + 1 + 1 + 2 + 1)
        assert stillhouse.main(command) == 0
        assert server_requests(url) == first  # the second run asks nothing
    report = json.loads((tmp_path / "runs" / "real" / "teacher" / "compare.json").read_text())
    assert [v["requested"] for v in report["variants"]] == [0] * 5
    assert all(v["prompt_tokens"] > 0 and v["latency_p50_s"] is not None for v in report["variants"])
    assert report["variants"][1]["prompt_tokens"] < report["variants"][0]["prompt_tokens"]  # 2 shots against the template's 6


def test_bad_variants_are_refused_naming_the_variant_and_field(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    build_run("bad", train=10, test=4)
    cases = {
        "variants: [{name: two, shots: 3, temperature: 0.5}]": "changes shots, temperature",
        "variants: [{name: typo, shotz: 3}]": "variants.0.shotz: unknown key",
        "variants: [{name: orphan, base: nowhere, shots: 3}]": "base 'nowhere' is not an earlier variant",
        "variants: [{name: wrong, selection: random}]": "variants.0.selection: Input should be 'fixed', 'balanced' or 'nearest'",
        "variants: [{name: shotless, selection: nearest}]": "variant 'shotless': teacher_variant.selection nearest chooses gold shots; set shots too",
    }
    for text, message in cases.items():
        (tmp_path / "v.yaml").write_text(text)
        assert stillhouse.main(["teacher", "compare", "--name", "bad", "--teacher-url", "http://127.0.0.1:9", "--variants", "v.yaml"]) == 2
        assert message in capsys.readouterr().err
    assert stillhouse.main(["teacher", "compare", "--name", "bad", "--teacher-url", "http://127.0.0.1:9", "--variant", "shots"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_self_consistency_samples_ask_as_the_runs_teacher_variant(stand_in, tmp_path, monkeypatch):
    teacher, url = stand_in
    monkeypatch.chdir(tmp_path)
    config = load_config(None, {"name": "sc", "base": "tiny", "data.train_size": 12, "data.test_size": 4, "teacher.url": f"{url}/v1",
                                "teacher.protocol": "openai", "teacher_variant.constrain": True, "teacher_variant.name": "constrained",
                                "curation.self_consistency.samples": 3})
    recipe.build(config, TASK, lambda _: None)
    recipe.prepare_curation(config, TASK, lambda _: None)
    sampled = [json.loads(line) for line in (tmp_path / "runs" / "sc" / "data" / "rows.jsonl").read_text().splitlines()]
    train = [row for row in sampled if row["split"] == "train"]
    assert train and all(len(row["teacher_samples"]) == 3 and set(row["teacher_samples"]) <= set(LABELS) for row in train)
    assert any("neutral" in row["teacher_samples"] for row in train)  # only the constrained teacher says neutral
    assert all(body["guided_choice"] == LABELS and body["temperature"] == 0.7 for body in teacher.bodies)


def test_a_variant_the_server_refuses_is_reported_with_its_error(tmp_path, monkeypatch):
    """A teacher that refuses every request (here: nothing listens) fails the variant's rows; the report says why."""
    from serving.loopback import free_port

    monkeypatch.chdir(tmp_path)
    build_run("down", train=10, test=4)
    assert stillhouse.main(["teacher", "compare", "--name", "down", "--teacher-url", f"http://127.0.0.1:{free_port()}",
                            "--variant", "shots=1"]) == 0
    report = json.loads((tmp_path / "runs" / "down" / "teacher" / "compare.json").read_text())
    assert all(v["failed"] == 4 and "ConnectionError" in v["first_error"] for v in report["variants"])
    assert "requests failed" in (tmp_path / "runs" / "down" / "teacher" / "compare.md").read_text()


def test_train_keeps_rows_labelled_before_curation(stand_in, tmp_path, monkeypatch):
    """`stillhouse label` then `stillhouse train`: the labelled rows are curated as they are, not rebuilt."""
    teacher, url = stand_in
    monkeypatch.chdir(tmp_path)
    build_run("kept", train=24, test=8)
    assert stillhouse.main(["label", "--name", "kept", "--teacher-url", url, "--teacher-protocol", "lorax"]) == 0
    rows_file = tmp_path / "runs" / "kept" / "data" / "rows.jsonl"
    labelled = rows_file.read_text()
    asked = teacher.requests
    assert stillhouse.main(["train", "--name", "kept", "--max-steps", "1", "--registry", str(tmp_path / "registry")]) == 0
    assert rows_file.read_text() == labelled and teacher.requests == asked
    assert (tmp_path / "runs" / "kept" / "data" / "train.jsonl").is_file()
