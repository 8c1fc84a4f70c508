"""Teacher variants as data: prompts, shot selection, the constraint each protocol sends, votes,
the one-change rule, the run config section, and the paired test."""

from __future__ import annotations

import json

import pytest
from scipy import stats

from training.config import ConfigError, EndpointConfig, load_config
from training.row import Row
from training.shots import ShotPool
from training.task import load_task
from training.teacher_compare import VariantError, mcnemar, parse_flag, resolve, VariantSpec
from training.teacher_variant import TeacherVariant, vote

TASK = load_task("demo")
LABELS = list(TASK.output.labels)
POOL = [Row(id=f"p{i}", inputs={"review": text}, gold=label) for i, (text, label) in enumerate([
    ("The pasta was great.", "positive"), ("The soup was great and hot.", "positive"), ("The desk was awful.", "negative"),
    ("The chair was broken.", "negative"), ("The bed was okay.", "neutral"), ("The soup was okay.", "neutral"),
    ("The laptop was perfect.", "positive"),
])]
QUERY = Row(id="q", inputs={"review": "The soup was awful."})


def test_the_default_variant_is_the_tasks_teacher_prompt():
    variant = TeacherVariant()
    assert variant.prompt(TASK, QUERY) == TASK.teacher_prompt(QUERY.inputs)
    assert variant.generation(TASK, "lorax") == TASK.generation and variant.constraint(TASK, "lorax") is None
    assert variant.changes() == {}


def test_shots_are_written_with_the_student_template_and_the_question_last():
    prompt = TeacherVariant(shots=2).prompt(TASK, QUERY, ShotPool(POOL, TASK))
    blocks = prompt.split("\n\n")
    assert len(blocks) == 3 and blocks[-1] == TASK.student_prompt(QUERY.inputs)
    assert all(block.startswith("Review: ") and block.split("Sentiment: ")[1] in LABELS for block in blocks[:2])
    assert TeacherVariant(shots=0).prompt(TASK, QUERY) == TASK.student_prompt(QUERY.inputs)
    instructed = TeacherVariant(instruction="Classify the review.").prompt(TASK, QUERY)
    assert instructed == "Classify the review.\n\n" + TASK.teacher_prompt(QUERY.inputs)
    custom = TeacherVariant(shots=1, shot_template="Text: {{review}}\nLabel:").prompt(TASK, QUERY, ShotPool(POOL, TASK))
    assert custom.endswith("Text: The soup was awful.\nLabel:") and custom.startswith("Text: ")


def test_selection_fixed_balanced_and_nearest():
    pool = ShotPool(POOL, TASK, seed=3)
    fixed = pool.choose(QUERY, 3, "fixed")
    assert fixed == pool.choose(Row(id="other", inputs={"review": "Anything at all."}), 3, "fixed")  # the same for every row
    balanced = pool.choose(QUERY, 6, "balanced")
    assert sorted(row.gold for row in balanced) == sorted(LABELS * 2)
    assert [row.gold for row in balanced[:3]] == LABELS  # round-robin in the task's label order
    nearest = pool.choose(QUERY, 2, "nearest")
    assert nearest[-1].inputs["review"] in ("The soup was okay.", "The desk was awful.")  # most similar sits next to the question
    assert all(row.id != "q" for row in nearest)
    # a row is never its own shot, by id or by input text
    member = POOL[0]
    assert member not in pool.choose(member, 7, "fixed")
    assert all(row.inputs != member.inputs for row in pool.choose(Row(id="copy", inputs=member.inputs), 7, "nearest"))


def test_the_constraint_request_per_protocol_and_reading_the_json_answer():
    variant = TeacherVariant(constrain=True)
    assert variant.constraint(TASK, "openai") == {"guided_choice": LABELS}
    lorax = variant.constraint(TASK, "lorax")["response_format"]
    assert lorax["type"] == "json_object"
    assert lorax["schema"] == {"type": "object", "properties": {"label": {"type": "string", "enum": LABELS}}, "required": ["label"]}
    assert variant.generation(TASK, "lorax").max_new_tokens >= len('{"label": "negative"}') // 4
    assert variant.read(' {"label": "neutral"}') == "neutral"
    assert variant.read(" neutral") == "neutral" and variant.read('{"label": 3}') == '{"label": 3}'
    assert TeacherVariant().read('{"label": "neutral"}') == '{"label": "neutral"}'  # unconstrained text is left alone


def test_votes_sample_at_their_temperature_and_the_majority_wins():
    variant = TeacherVariant(votes=5, vote_temperature=0.9, temperature=0.0)
    assert variant.generation(TASK, "openai").temperature == 0.9
    assert TeacherVariant(temperature=0.4).generation(TASK, "openai").temperature == 0.4
    assert vote(TASK, ["positive", " Neutral.", "neutral", "negative", "positive"]) == ("positive", 0.4)  # first sampled among equals
    assert vote(TASK, ["neutral", "gibberish", "neutral"]) == ("neutral", pytest.approx(2 / 3))


def test_problems_name_the_field_and_fix():
    assert any("template uses ['text']" in p for p in TeacherVariant(template="Say {{text}}").problems(TASK))
    assert any("brings its own shots" in p for p in TeacherVariant(template="{{review}}", shots=2).problems(TASK))
    assert any("set shots too" in p for p in TeacherVariant(selection="nearest").problems(TASK))
    assert any("shot_template writes gold shots" in p for p in TeacherVariant(shot_template="{{review}}").problems(TASK))


def test_a_variant_changes_one_thing_and_builds_on_its_base():
    with pytest.raises(ValueError, match="changes shots, temperature; a variant changes ONE thing"):
        VariantSpec(name="x", shots=2, temperature=0.3)
    with pytest.raises(ValueError, match="changes nothing"):
        VariantSpec(name="x")
    assert VariantSpec(name="v", votes=3, vote_temperature=0.5).change == "votes=3, vote_temperature=0.5"
    teacher = EndpointConfig(url="http://127.0.0.1:1")
    specs = [VariantSpec(name="six", shots=6), VariantSpec(name="bal", base="six", selection="balanced"), parse_flag("endpoint.model=other")]
    current, six, bal, other = resolve(specs, TeacherVariant(), teacher, TASK)
    assert (six.variant.shots, six.variant.selection) == (6, "fixed")
    assert (bal.variant.shots, bal.variant.selection, bal.base) == (6, "balanced", "six")
    assert other.endpoint.model == "other" and other.endpoint.url == teacher.url and other.variant.changes() == {}
    with pytest.raises(VariantError, match="the name is taken"):
        resolve([VariantSpec(name="six", shots=6), VariantSpec(name="six", shots=3)], TeacherVariant(), teacher, TASK)
    assert parse_flag("constrain=true").constrain is True
    with pytest.raises(VariantError, match="unknown key"):
        parse_flag("shotz=3")


def test_the_run_config_holds_a_typed_teacher_variant(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("name: r\nteacher_variant: {name: balanced-6, shots: 6, selection: balanced}\n")
    assert load_config(config).teacher_variant == TeacherVariant(name="balanced-6", shots=6, selection="balanced")
    config.write_text("name: r\nteacher_variant: {shots: 6, shot_count: 3}\n")
    with pytest.raises(ConfigError, match="teacher_variant.shot_count: unknown key"):
        load_config(config)
    saved = json.loads(load_config(None, {"name": "r"}).model_dump_json())
    assert saved["teacher_variant"]["name"] == "current"


def test_mcnemar_matches_the_exact_binomial_test():
    current = [True] * 10 + [False] * 8 + [True] * 2
    other = [True] * 10 + [True] * 8 + [False] * 2
    result = mcnemar(current, other)
    assert (result["only_current_right"], result["only_variant_right"], result["exact"]) == (2, 8, True)
    assert result["p_value"] == pytest.approx(stats.binomtest(2, 10, 0.5).pvalue)
