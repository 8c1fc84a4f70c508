"""Tasks: what a distilled adapter does, declared in one YAML file.

A task names its input fields, the teacher's prompt template (e.g. few-shot), the student's
(e.g. zero-shot), the output format (a label set, a regex, or a JSON schema) and the metrics it
is evaluated with. Templates use ``{{field}}`` placeholders for the input fields (see
``serving.prompts``; single braces are literal text). Built-in tasks live in
``training/tasks/<name>.yaml``; ``demo`` is the 3-way sentiment task.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import jsonschema
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving import prompts
from serving.prompts import Template

TASKS_DIR = Path(__file__).parent / "tasks"
_ALIASES = {"demo": "sentiment"}

Role = Literal["teacher", "student"]
ROLES: tuple[Role, ...] = ("teacher", "student")

# Metrics each output format supports; the first is the task's primary metric by default.
_FORMAT_METRICS = {
    "labels": ("accuracy", "macro_f1", "exact_match"),
    "regex": ("exact_match", "regex_match"),
    "json": ("json_valid", "exact_match"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Parsed:
    """An output checked against the task's format: ``value`` is None when ``code`` says why."""

    value: Any
    code: str  # "ok", "empty", "not_a_label", "no_regex_match", "invalid_json", "schema_violation"


class LabelOutput(_Strict):
    """The output is one label from a fixed set (compared case-insensitively, first word)."""

    type: Literal["labels"]
    labels: list[str] = Field(min_length=2)

    def parse(self, text: str) -> Parsed:
        """``text`` (stripped, non-empty) as one of the labels, spelled as declared."""
        first = text.split()[0].strip(".,;:!\"'").lower()
        labels = {label.lower(): label for label in self.labels}
        return Parsed(labels[first], "ok") if first in labels else Parsed(None, "not_a_label")


class RegexOutput(_Strict):
    """The output must match ``pattern`` in full."""

    type: Literal["regex"]
    pattern: str

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a valid regular expression ({error}); escape special characters") from None
        return pattern

    def parse(self, text: str) -> Parsed:
        """``text`` (stripped, non-empty) when the pattern matches all of it."""
        return Parsed(text, "ok") if re.fullmatch(self.pattern, text) else Parsed(None, "no_regex_match")


class JsonOutput(_Strict):
    """The output is a JSON document valid under ``schema`` (JSON Schema)."""

    type: Literal["json"]
    schema_: dict[str, Any] = Field(alias="schema")

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as error:
            raise ValueError(f"not a valid JSON Schema ({error.message})") from None
        return schema

    def parse(self, text: str) -> Parsed:
        """``text`` (stripped, non-empty) as a JSON document valid under the schema."""
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            return Parsed(None, "invalid_json")
        if not jsonschema.Draft202012Validator(self.schema_).is_valid(document):
            return Parsed(None, "schema_violation")
        return Parsed(document, "ok")


OutputFormat = Annotated[Union[LabelOutput, RegexOutput, JsonOutput], Field(discriminator="type")]


def parse_output(output: LabelOutput | RegexOutput | JsonOutput, text: str | None) -> Parsed:
    """A raw completion checked against an output format (surrounding white space ignored); never raises."""
    text = (text or "").strip()
    return output.parse(text) if text else Parsed(None, "empty")


class Generation(_Strict):
    """How the teacher and the student are asked to answer."""

    max_new_tokens: int = Field(16, ge=1, le=4096)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    temperature: float = Field(0.0, ge=0.0)


class JudgeCriterion(_Strict):
    """An LLM-judge criterion: at evaluation time a judge endpoint answers ``prompt`` with a score."""

    prompt: str  # uses {{input}} and {{output}}; {{reference}} is the gold (or teacher) answer
    scale: tuple[float, float] = (0.0, 1.0)  # the lowest and highest valid score; anything else is unscored

    @model_validator(mode="after")
    def _usable(self) -> "JudgeCriterion":
        from training.judge import check_prompt  # the judge module imports this one

        problems = [f"judge.prompt {problem}" for problem in check_prompt(self.prompt)]
        if self.scale[0] >= self.scale[1]:
            problems.append(f"judge.scale {list(self.scale)} is empty; give [lowest, highest], e.g. [1, 5]")
        if problems:
            raise ValueError("; ".join(problems))
        return self



class Task(_Strict):
    """A distillation task: inputs, the teacher's and student's prompts, the output format, metrics."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = ""
    input_fields: list[str] = Field(min_length=1)
    teacher_template: str
    student_template: str
    output: OutputFormat
    completion_prefix: str = " "
    generation: Generation = Field(default_factory=Generation)
    metrics: list[str] = Field(default_factory=list)
    judge: JudgeCriterion | None = None  # optional LLM-judge criterion (`stillhouse eval --judge-url`)
    generator: str | None = None  # a module with `generate(split, n, seed)` producing gold rows

    @model_validator(mode="after")
    def _consistent(self) -> "Task":
        problems = [f"{role}_template {problem}" for role in ROLES for problem in prompts.check(getattr(self, f"{role}_template"), self.input_fields)]
        allowed = _FORMAT_METRICS[self.output.type]
        bad = [metric for metric in self.metrics if metric not in allowed]
        if bad:
            problems.append(f"metrics {bad} do not apply to {self.output.type} outputs; use some of {list(allowed)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def primary_metric(self) -> str:
        return (self.metrics or list(_FORMAT_METRICS[self.output.type]))[0]

    @property
    def metric_names(self) -> list[str]:
        return self.metrics or list(_FORMAT_METRICS[self.output.type])

    @cached_property
    def _templates(self) -> dict[Role, Template]:
        return {role: Template(getattr(self, f"{role}_template")) for role in ROLES}

    def template(self, role: Role) -> Template:
        """The teacher's or the student's prompt template."""
        return self._templates[role]

    def teacher_prompt(self, inputs: Mapping[str, Any]) -> str:
        """The teacher's prompt for one row's inputs."""
        return self._templates["teacher"].render(inputs)

    def student_prompt(self, inputs: Mapping[str, Any]) -> str:
        """The student's (served adapter's) prompt for one row's inputs."""
        return self._templates["student"].render(inputs)

    def inputs_from_prompt(self, prompt: str) -> dict[str, str] | None:
        """Recover the input fields from a rendered teacher or student prompt (e.g. a logged request); None if neither matches."""
        for template in self._templates.values():
            inputs = template.match(prompt)
            if inputs is not None:
                return inputs
        return None

    def input_text(self, inputs: Mapping[str, Any]) -> str:
        """The inputs as one string: what near-duplicate detection compares."""
        return "\n".join(str(inputs[field]) for field in self.input_fields)

    def parse(self, text: str) -> Parsed:
        """Check a raw completion against the output format; never raises on bad data."""
        return parse_output(self.output, text)

    def completion(self, output: str) -> str:
        """The text the student is trained to produce after its prompt."""
        return self.completion_prefix + output.strip()


class TaskError(ValueError):
    """A task file is invalid; the message lists every problem with its field and fix."""


def load_task(name_or_path: str | Path) -> Task:
    """A built-in task by name (``demo``, ``sentiment``) or a task YAML file, validated."""
    path = _task_path(str(name_or_path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TaskError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a task file is a YAML mapping with name, input_fields, templates and output")
    try:
        return Task.model_validate(data)
    except ValidationError as error:
        raise TaskError(f"{path}: {describe_errors(error)}") from None


def describe_errors(error: ValidationError) -> str:
    """Every pydantic error as 'field: problem — fix', one per line."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key — remove it or check its spelling")
        elif item["type"] == "missing":
            lines.append(f"{field}: required — add it")
        else:
            lines.append(f"{field}: {item['msg']}")
    return f"{len(lines)} problem(s):\n  " + "\n  ".join(lines)


def _task_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise TaskError(f"task file {candidate} does not exist")
        return candidate
    builtin = TASKS_DIR / f"{_ALIASES.get(name_or_path, name_or_path)}.yaml"
    if not builtin.is_file():
        known = sorted([*_ALIASES, *(p.stem for p in TASKS_DIR.glob("*.yaml"))])
        raise TaskError(f"unknown task {name_or_path!r}; use a built-in task ({', '.join(known)}) or a task YAML path")
    return builtin
