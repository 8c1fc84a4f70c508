"""The traffic-split file: which arms serve each route, with what weight, prompt and fallback.

```yaml
version: 1
salt: "exp-2026-11"                # changing it reshuffles every unit
sticky: {header: X-User-Id}        # or {body_field: user}, or {per_request: true}
default_upstream: http://127.0.0.1:8080   # where adapter ids that name no route go
routes:
  sentiment:                       # clients call adapter_id / model = "sentiment"
    mode: template                 # template: arms render their prompt from the input; passthrough: as sent
    input: text                    # the client's prompt: {{text}} in a template, a task prompt's input field
    metrics: {correct: {type: boolean, goal: maximize}}
    arms:
      teacher: {role: control, upstream: http://127.0.0.1:8080, adapter: null, prompt: {task: sentiment, role: teacher}, weight: 50, fallback: true}
      student-v1: {role: candidate, upstream: http://127.0.0.1:8080, adapter: s@v1, prompt: {task: sentiment, role: student}, weight: 50, timeout_s: 10}
      student-v2: {role: candidate, upstream: http://127.0.0.1:8080, adapter: s@v2, prompt: {task: sentiment, role: student}, weight: 0}
    shadow: [{arm: student-v2, fraction: 0.1, compare: exact}]   # a weight-0 arm, mirrored only
```

An arm's prompt is either its own ``template`` (``serving.prompts`` syntax, e.g.
``"Summarise: {{text}}"`` with the route's input in double braces; single braces are literal
text) or a task's, named by ``prompt: {task, role}`` so the route sends exactly what the adapter
was trained on: the task's teacher or student template, the client's prompt in its one input
field. The task (a built-in name or a task YAML path) is read when the file is loaded, which makes
abtest depend on ``training.task`` (abtest → training); the arm's ``template`` then holds the
resolved text, which ``template_version`` names on log rows.

``load`` reports every problem at once, each with its field path and a fix; unknown keys are
refused. ``TrafficConfig.version_hash`` is a hash of the canonical content, stamped on log rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic import ValidationError as PydanticValidationError

from abtest.experiment import Experiment
from serving import prompts
from serving.prompts import Template


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sticky(_Strict):
    """What identifies a unit (the thing that always gets the same arm)."""

    header: str | None = None
    body_field: str | None = None
    per_request: bool = False


class MetricSpec(_Strict):
    """A feedback metric a route accepts: boolean (0/1) or float, and which way is better."""

    type: Literal["boolean", "float"]
    goal: Literal["maximize", "minimize"] = "maximize"


class OutputCheck(_Strict):
    """An online check the router runs on every answer, exported per arm as a boolean metric.

    Exactly one of: ``labels`` (the answer's first word is one of them), ``regex`` (matches the
    whole answer) or ``json_schema`` (the answer is a JSON document valid under it): the output
    formats of a task (``training.task``), checked the same way.
    """

    labels: list[str] | None = Field(default=None, min_length=2)
    regex: str | None = None
    json_schema: dict[str, Any] | None = None
    _format: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_format(self) -> "OutputCheck":
        from training.task import JsonOutput, LabelOutput, RegexOutput  # abtest's other use of training/: output formats

        given = [key for key in ("labels", "regex", "json_schema") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of labels, regex or json_schema (got {given or 'none'})")
        try:
            if self.labels is not None:
                self._format = LabelOutput(type="labels", labels=self.labels)
            elif self.regex is not None:
                self._format = RegexOutput(type="regex", pattern=self.regex)
            else:
                self._format = JsonOutput(type="json", schema=self.json_schema)
        except PydanticValidationError as error:
            raise ValueError("; ".join(item["msg"].removeprefix("Value error, ") for item in error.errors())) from None
        return self

    def passes(self, text: str | None) -> bool:
        from training.task import parse_output

        return parse_output(self._format, text).code == "ok"


class TaskPrompt(_Strict):
    """A task's prompt, named instead of repeated: the client's prompt fills the task's one input field."""

    task: str  # a built-in task (e.g. sentiment) or a task YAML path
    role: Literal["teacher", "student"]


class Arm(_Strict):
    """One way to answer a route: an upstream server, an adapter on it, a prompt template."""

    role: Literal["control", "candidate"]
    upstream: str
    adapter: str | None = None  # None: the upstream's base model
    template: str | None = None  # uses the route's input, e.g. {{text}}; for a `prompt` arm, the task's template resolved at load
    prompt: TaskPrompt | None = None
    weight: float = Field(default=0, ge=0)
    fallback: bool = False
    timeout_s: float = Field(default=30.0, gt=0)

    @model_serializer(mode="wrap")
    def _as_written(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.prompt is not None:
            data.pop("template", None)  # derived from the task at load, so a dump parses again
        return data


class Shadow(_Strict):
    """Mirror a fraction of a route's requests to an arm in the background, never served."""

    arm: str
    fraction: float = Field(gt=0, le=1)
    compare: Literal["exact"] = "exact"


class Route(_Strict):
    """A name clients use as adapter_id / model, split between arms."""

    mode: Literal["template", "passthrough"] = "passthrough"
    input: str = Field(default="text", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    metrics: dict[str, MetricSpec] = Field(default_factory=dict)
    arms: dict[str, Arm]
    shadow: list[Shadow] = Field(default_factory=list)
    checks: dict[str, OutputCheck] = Field(default_factory=dict)  # online output checks, boolean metrics per arm
    experiment: Experiment | None = None  # the pre-registered analysis plan (abtest/experiment.py)

    def render(self, arm: Arm, prompt: str) -> str:
        """The prompt an arm receives: its template with the client's prompt filled in."""
        if self.mode == "passthrough" or arm.template is None:
            return prompt
        return Template(arm.template).render({self.input: prompt})

    def weights(self) -> dict[str, float]:
        return {name: arm.weight for name, arm in self.arms.items()}

    def fallback_arm(self) -> str | None:
        return next((name for name, arm in self.arms.items() if arm.fallback), None)

    def control_arm(self) -> str:
        return next(name for name, arm in self.arms.items() if arm.role == "control")

    def candidate_arms(self) -> list[str]:
        return [name for name, arm in self.arms.items() if arm.role == "candidate"]


class TrafficConfig(_Strict):
    """The whole traffic-split file."""

    version: Literal[1]
    salt: str = Field(min_length=1)
    sticky: Sticky = Field(default_factory=lambda: Sticky(per_request=True))
    default_upstream: str | None = None
    routes: dict[str, Route] = Field(default_factory=dict)

    @cached_property  # configs are never mutated: with_weights and reloads build new ones
    def version_hash(self) -> str:
        """12 hex characters of sha256 over the canonical JSON: equal content, equal version."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def template_version(template: str | None) -> str | None:
    """8 hex characters naming a template's text, stamped on log rows."""
    return hashlib.sha256(template.encode()).hexdigest()[:8] if template is not None else None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file: where, what, and how to fix it."""

    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}; fix: {self.fix}"


class ConfigError(Exception):
    """A traffic-split file that cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the traffic-split config:\n{lines}")


_FIXES = {
    "extra_forbidden": "remove it or correct its spelling (see abtest/config.py for the keys)",
    "missing": "add it",
    "literal_error": "use one of the values listed",
    "greater_than_equal": "raise it",
    "greater_than": "raise it",
    "less_than_equal": "lower it",
    "string_too_short": "set a non-empty value",
    "string_pattern_mismatch": "use letters, digits and underscores",
}


def _schema_problems(error: PydanticValidationError) -> list[Problem]:
    problems = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        fix = _FIXES.get(item["type"], "give it the documented type")
        problems.append(Problem(path, item["msg"], fix))
    return problems


def _as_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _semantic_problems(raw: dict) -> list[Problem]:
    """Cross-field rules, checked on the raw mapping so they are reported next to schema errors."""
    problems = []
    sticky = raw.get("sticky")
    if isinstance(sticky, dict):
        chosen = [k for k in ("header", "body_field") if sticky.get(k)] + (["per_request"] if sticky.get("per_request") else [])
        if len(chosen) != 1:
            problems.append(Problem("sticky", f"exactly one of header, body_field, per_request must be set (got {chosen or 'none'})",
                                    "e.g. `sticky: {header: X-User-Id}` or `sticky: {per_request: true}`"))
    for route_name, route in _as_dict(raw.get("routes")).items():
        route = _as_dict(route)
        where = f"routes.{route_name}"
        arms = {name: _as_dict(arm) for name, arm in _as_dict(route.get("arms")).items()}
        if "arms" in route and not arms:
            problems.append(Problem(f"{where}.arms", "a route needs at least one arm", "add a control arm"))
            continue
        controls = [n for n, a in arms.items() if a.get("role") == "control"]
        if arms and len(controls) != 1:
            problems.append(Problem(f"{where}.arms", f"exactly one arm must have role: control (got {controls or 'none'})",
                                    "mark the arm that serves today as `role: control`"))
        fallbacks = [n for n, a in arms.items() if a.get("fallback")]
        if len(fallbacks) > 1:
            problems.append(Problem(f"{where}.arms", f"at most one arm may be the fallback (got {fallbacks})", "keep `fallback: true` on one arm"))
        weights = [a.get("weight", 0) for a in arms.values()]
        if arms and all(isinstance(w, (int, float)) for w in weights) and sum(weights) <= 0:
            problems.append(Problem(f"{where}.arms", "the weights add up to 0, so no arm can be chosen", "give at least one arm a positive weight"))
        mode = route.get("mode", "passthrough")
        field = str(route.get("input", "text"))
        placeholder = "{{" + field + "}}"
        for name, arm in arms.items():
            template, task_prompt = arm.get("template"), arm.get("prompt")
            if template is not None and task_prompt is not None:
                problems.append(Problem(f"{where}.arms.{name}.prompt", "an arm takes its own template or a task's prompt, not both",
                                        "remove `template:` to send the task's prompt, or remove `prompt:`"))
            elif mode == "template" and task_prompt is None and not isinstance(template, str):
                problems.append(Problem(f"{where}.arms.{name}.template", f"template mode needs a template containing {placeholder} or a task's prompt",
                                        f"add `template: \"...{placeholder}...\"` or `prompt: {{task: NAME, role: student}}`"))
            elif mode == "template" and isinstance(template, str):
                problems += [Problem(f"{where}.arms.{name}.template", f"the template {problem.message}", problem.fix)
                             for problem in prompts.check(template, [field])]
            for key, value in (("template", template), ("prompt", task_prompt)):
                if mode == "passthrough" and value is not None:
                    problems.append(Problem(f"{where}.arms.{name}.{key}", f"passthrough routes send the prompt as is, so a {key} would be ignored",
                                            "remove it, or set `mode: template`"))
            upstream = arm.get("upstream")
            if isinstance(upstream, str) and not upstream.startswith(("http://", "https://")):
                problems.append(Problem(f"{where}.arms.{name}.upstream", f"{upstream!r} is not an http(s) URL", "write it as http://HOST:PORT"))
        for index, shadow in enumerate(route.get("shadow") or []):
            arm_name = _as_dict(shadow).get("arm")
            if arm_name is not None and arm_name not in arms:
                problems.append(Problem(f"{where}.shadow.{index}.arm", f"{arm_name!r} is not an arm of this route",
                                        f"define it under {where}.arms (weight 0 to only mirror traffic to it)"))
        for name, metric in _as_dict(route.get("metrics")).items():
            if not str(name).replace("_", "").isalnum():
                problems.append(Problem(f"{where}.metrics.{name}", "metric names become Prometheus label values and API keys",
                                        "use letters, digits and underscores"))
        for name in _as_dict(route.get("checks")):
            if not str(name).replace("_", "").isalnum():
                problems.append(Problem(f"{where}.checks.{name}", "check names become Prometheus label values",
                                        "use letters, digits and underscores"))
            if name in _as_dict(route.get("metrics")):
                problems.append(Problem(f"{where}.checks.{name}", "a feedback metric has the same name",
                                        "rename the check or the metric: one name, one meaning"))
        experiment = route.get("experiment")
        if isinstance(experiment, dict):
            declared = {str(name): "boolean" for name in _as_dict(route.get("checks"))}
            declared |= {str(name): str(_as_dict(spec).get("type")) for name, spec in _as_dict(route.get("metrics")).items()}
            for key in ("primary", "secondary"):
                names = experiment.get(key)
                for index, name in enumerate([names] if key == "primary" else names if isinstance(names, list) else []):
                    path = f"{where}.experiment.{key}" + ("" if key == "primary" else f".{index}")
                    if isinstance(name, str) and name not in declared:
                        problems.append(Problem(path, f"{name!r} is neither a metric nor a check of this route",
                                                f"use one of {sorted(declared)} or declare it under {where}.metrics or .checks"))
            if experiment.get("primary") in (experiment.get("secondary") or []):
                problems.append(Problem(f"{where}.experiment.secondary", "the primary metric is listed again", "remove it from secondary"))
    default = raw.get("default_upstream")
    if isinstance(default, str) and not default.startswith(("http://", "https://")):
        problems.append(Problem("default_upstream", f"{default!r} is not an http(s) URL", "write it as http://HOST:PORT"))
    return problems


def _task_templates(raw: dict) -> tuple[dict[tuple[str, str], str], list[Problem]]:
    """The template of each ``prompt: {task, role}`` arm: the task's, with the route's input in its input field."""
    from training.task import ROLES, TaskError, load_task  # abtest's one use of training/: the task a prompt names

    templates, problems = {}, []
    for route_name, route in _as_dict(raw.get("routes")).items():
        route = _as_dict(route)
        field = str(route.get("input", "text"))
        for arm_name, arm in _as_dict(route.get("arms")).items():
            task_prompt = _as_dict(_as_dict(arm).get("prompt"))
            if not isinstance(task_prompt.get("task"), str) or task_prompt.get("role") not in ROLES:
                continue  # a schema problem, reported with the others
            where = f"routes.{route_name}.arms.{arm_name}.prompt"
            try:
                task = load_task(task_prompt["task"])
            except TaskError as error:
                problems.append(Problem(f"{where}.task", str(error), "name a built-in task or a task YAML file that loads"))
                continue
            if len(task.input_fields) != 1:
                problems.append(Problem(f"{where}.task", f"task {task.name!r} has input fields {task.input_fields}, but a route's client sends one prompt",
                                        f"name a task with one input field, or write the arm's own `template:` with {{{{{field}}}}}"))
                continue
            templates[(route_name, arm_name)] = task.template(task_prompt["role"]).render({task.input_fields[0]: "{{" + field + "}}"})
    return templates, problems


def parse(raw: object, source: str = "config") -> TrafficConfig:
    """Validate a mapping and resolve its task prompts; raise ``ConfigError`` listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [Problem("(top level)", "the file is not a mapping", "start from abtest/examples/traffic.yaml")])
    problems = []
    config = None
    try:
        config = TrafficConfig.model_validate(raw)
    except PydanticValidationError as error:
        problems += _schema_problems(error)
    problems += _semantic_problems(raw)
    templates, task_problems = _task_templates(raw)
    problems += task_problems
    if problems:
        raise ConfigError(source, problems)
    for (route, arm), template in templates.items():
        config.routes[route].arms[arm].template = template
    return config


def load(path: str | Path) -> TrafficConfig:
    """Read and validate a traffic-split YAML file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), [Problem("(file)", f"byte {error.start} is not valid UTF-8 ({error.reason})",
                                              "save the file as UTF-8")]) from error
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(str(path), [Problem("(file)", str(error).replace("\n", " "), "fix the YAML syntax or the path")]) from error
    return parse(raw, str(path))


def with_weights(config: TrafficConfig, route: str, weights: dict[str, float]) -> TrafficConfig:
    """A copy of ``config`` with new weights for some arms of one route (validated like a file)."""
    raw = config.model_dump(mode="json")
    if route not in raw["routes"]:
        raise ConfigError("weights", [Problem("route", f"{route!r} is not a route", f"use one of {sorted(raw['routes'])}")])
    problems = []
    for arm, weight in weights.items():
        if arm not in raw["routes"][route]["arms"]:
            problems.append(Problem(f"weights.{arm}", "not an arm of this route", f"use one of {sorted(raw['routes'][route]['arms'])}"))
        elif not isinstance(weight, (int, float)) or not 0 <= weight < 1e300:  # NaN, inf and integers too big for a float fail too
            problems.append(Problem(f"weights.{arm}", f"{weight!r} is not a non-negative number", "send a number >= 0"))
        else:
            raw["routes"][route]["arms"][arm]["weight"] = weight
    if problems:
        raise ConfigError("weights", problems)
    return parse(raw, "weights")
