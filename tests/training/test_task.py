"""Task files: the demo task, every problem reported at once, output parsing, prompt inversion."""

from __future__ import annotations

import pytest
import yaml

from training.task import TaskError, load_task
from training.tasks import sentiment_data


def test_demo_task_renders_a_few_shot_teacher_and_a_zero_shot_student():
    task = load_task("demo")
    inputs = {"review": "Great soup."}
    assert task.student_prompt(inputs) == "Review: Great soup.\nSentiment:"
    assert task.teacher_prompt(inputs).endswith("Review: Great soup.\nSentiment:")
    assert task.teacher_prompt(inputs).count("Sentiment:") == 7
    assert task.primary_metric == "accuracy"
    assert task.completion("positive") == " positive"


def test_every_problem_in_a_task_file_is_reported_with_its_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: Bad Name\n"
        "input_fields: [text]\n"
        "teacher_template: 'Q: {{question}}'\n"
        "student_template: '{{text}}'\n"
        "output: {type: labels, labels: [spam, ham]}\n"
        "metrics: [json_valid]\n"
        "colour: blue\n"
    )
    with pytest.raises(TaskError) as caught:
        load_task(path)
    message = str(caught.value)
    assert "name:" in message
    assert "colour: unknown key" in message
    # The model-level checks run only once the fields parse; fix the two field errors and they show.
    path.write_text(path.read_text().replace("Bad Name", "bad").replace("colour: blue\n", ""))
    with pytest.raises(TaskError) as caught:
        load_task(path)
    message = str(caught.value)
    assert "teacher_template uses ['question']" in message
    assert "metrics ['json_valid'] do not apply to labels outputs" in message


def test_unknown_task_names_the_builtin_ones():
    with pytest.raises(TaskError, match="demo"):
        load_task("nope")


def test_parse_checks_each_output_format(tmp_path):
    labels = load_task("demo")
    assert labels.parse(" Positive.").value == "positive"
    assert labels.parse("great").code == "not_a_label"
    assert labels.parse("  ").code == "empty"

    json_task = tmp_path / "json.yaml"
    json_task.write_text(
        "name: extract\ninput_fields: [text]\nteacher_template: '{{text}}'\nstudent_template: '{{text}}'\n"
        "output: {type: json, schema: {type: object, required: [city], properties: {city: {type: string}}}}\n"
    )
    task = load_task(json_task)
    assert task.parse('{"city": "Paris"}').value == {"city": "Paris"}
    assert task.parse('{"town": "Paris"}').code == "schema_violation"
    assert task.parse("{city").code == "invalid_json"

    regex_task = tmp_path / "regex.yaml"
    regex_task.write_text(
        "name: code\ninput_fields: [text]\nteacher_template: '{{text}}'\nstudent_template: '{{text}}'\n"
        "output: {type: regex, pattern: '[A-Z]{3}-[0-9]+'}\n"
    )
    task = load_task(regex_task)
    assert task.parse("ABC-12").code == "ok"
    assert task.parse("abc-12").code == "no_regex_match"


def test_inputs_are_recovered_from_logged_prompts():
    task = load_task("demo")
    for render in (task.teacher_prompt, task.student_prompt):
        assert task.inputs_from_prompt(render({"review": "Odd {braces}\nand lines"})) == {"review": "Odd {braces}\nand lines"}
    assert task.inputs_from_prompt("The capital of France is") is None


def test_generator_is_deterministic_and_heldout_vocabulary_is_unseen_in_training():
    train = sentiment_data.generate("train", 300, seed=0)
    assert train == sentiment_data.generate("train", 300, seed=0)
    assert {row["label"] for row in train} == set(sentiment_data.LABELS)
    assert len({row["domain"] for row in train}) >= 8
    heldout = sentiment_data.generate("heldout", 300, seed=0)
    train_words = {word.strip(".,:").lower() for row in train for word in row["review"].split()}
    heldout_vocabulary = sentiment_data._VOCABULARY["heldout"]
    sentiment_words = {word for words in heldout_vocabulary["adjectives"].values() for word in words}
    assert not sentiment_words & train_words
    assert all(any(word in row["review"] for word in sentiment_words) for row in heldout)
    heldout_subjects = {subject for subjects in heldout_vocabulary["subjects"].values() for subject in subjects}
    assert not any(subject in row["review"] for row in train for subject in heldout_subjects)


def test_a_single_brace_placeholder_of_a_field_is_refused_with_the_fix(tmp_path):
    spec = load_task("demo").model_dump(by_alias=True)
    path = tmp_path / "old.yaml"
    for key, value, expected in [
        ("student_template", "Review: {review}\nSentiment:", "student_template has {review} in single braces, which is literal text; write {{review}}"),
        ("judge", {"prompt": "Rate {output} for {{input}}"}, "judge.prompt has {output} in single braces, which is literal text; write {{output}}"),
    ]:
        path.write_text(yaml.safe_dump({**spec, "generator": None, key: value}))
        with pytest.raises(TaskError) as caught:
            load_task(path)
        assert expected in str(caught.value)
        assert "never uses" not in str(caught.value)  # a single-brace field is reported once, with its fix


def test_single_braces_are_literal_so_a_json_few_shot_prompt_needs_no_escaping(tmp_path):
    path = tmp_path / "json.yaml"
    path.write_text(yaml.safe_dump({
        "name": "extract",
        "input_fields": ["text"],
        "teacher_template": '{"text": "Lovely."} -> {"label": "positive"}\n{"text": "{{text}}"} ->',
        "student_template": "{{ text }} ->",
        "output": {"type": "json", "schema": {"type": "object"}},
    }))
    task = load_task(path)
    prompt = task.teacher_prompt({"text": "Odd {text}"})
    assert prompt == '{"text": "Lovely."} -> {"label": "positive"}\n{"text": "Odd {text}"} ->'
    assert task.inputs_from_prompt(prompt) == {"text": "Odd {text}"}
    assert task.student_prompt({"text": "Odd"}) == "Odd ->" and task.template("student").fields == ("text",)
