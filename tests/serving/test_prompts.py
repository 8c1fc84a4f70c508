"""Prompt templates: rendering, its inverse, and the checks every template owner runs."""

from __future__ import annotations

import pytest

from serving.prompts import Template, TemplateError, check


def test_render_fills_each_placeholder_and_leaves_single_braces_as_text():
    template = Template('{"q": "{{ question }}"} {label} -> {{answer}}')
    assert template.fields == ("question", "answer")
    assert template.render({"question": "Why?", "answer": 42, "unused": "x"}) == '{"q": "Why?"} {label} -> 42'
    assert Template("no fields").render({}) == "no fields"


def test_render_refuses_a_missing_field_naming_it():
    with pytest.raises(TemplateError, match=r"no value for \{\{answer\}\}; pass a value for every field of the template \['question', 'answer'\]"):
        Template("{{question}} {{answer}}").render({"question": "Why?"})


@pytest.mark.parametrize("text, values", [
    ("Review: {{review}}\nSentiment:", {"review": "Odd {braces}\nand {{lines}}"}),
    ('{"a": "{{a}}", "b": {{b}}} end', {"a": "x}", "b": "{y"}),
    ("{{a}} and {{a}} then {{b}}.", {"a": "same", "b": "other"}),
    ("{{a}}", {"a": ""}),
])
def test_match_inverts_render(text, values):
    template = Template(text)
    assert template.match(template.render(values)) == values


def test_match_back_references_a_repeated_field_and_refuses_other_text():
    template = Template("{{a}}={{a}}")
    assert template.match("x=x") == {"a": "x"}
    assert template.match("x=y") is None
    assert Template("Review: {{review}}\nSentiment:").match("The capital of France is") is None


def test_check_reports_unknown_missing_and_single_brace_fields():
    problems = [str(problem) for problem in check("{{txt}} {label} {text}", ["text", "label"], required=["text"])]
    assert problems == [
        "uses ['txt'], which is not among its fields ['text', 'label']; correct the placeholder or declare the field",
        "has {text} in single braces, which is literal text; write {{text}}",
        "has {label} in single braces, which is literal text; write {{label}}",
    ]
    assert [str(p) for p in check("Review:", ["review"])] == ["never uses {{review}}; add {{review}} where its value goes"]
    assert check("{{{review}}} {{review}}", ["review"]) == []  # a brace next to a placeholder is literal
    assert check("{{review}} {other}", ["review"]) == []  # single braces around anything else are plain text
