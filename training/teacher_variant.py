"""Teacher variants: how the teacher is asked, and the prompt and request that follow from it.

The run config's ``teacher_variant`` (default: the task's teacher template as it is) is what
`stillhouse label` asks with and what `stillhouse teacher compare` varies one field at a time:
the whole few-shot ``template``; ``shots`` chosen from gold rows (``selection``: fixed, balanced
per label, nearest neighbours) and written with ``shot_template``; the ``instruction`` wording put
before the prompt; ``constrain`` (the answer is one of the labels); ``temperature``; and
self-consistency ``votes`` over samples at ``vote_temperature``. The endpoint (server, model) is
the run config's ``teacher``.

A constrained answer is asked as vLLM's ``guided_choice`` on OpenAI endpoints and as a JSON
schema whose ``label`` is an enum of the labels on LoRAX endpoints; :meth:`TeacherVariant.read`
unwraps that JSON. Everything here is pure; asking is :func:`training.labelling.ask`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving import prompts
from serving.prompts import Template
from training.row import Row
from training.task import Generation, Task

if TYPE_CHECKING:
    from training.shots import ShotPool

Protocol = Literal["lorax", "openai"]
CURRENT = "current"
#: room for a whole label (guided choice) or a whole ``{"label": "..."}`` document (JSON schema)
_CONSTRAINED_TOKENS = {"openai": 8, "lorax": 24}


class TeacherVariant(BaseModel):
    """How the teacher is asked; unset fields keep the task's teacher prompt and generation settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(CURRENT, pattern=r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,63}$")
    template: str | None = None  # a whole teacher template (its own shots included) in place of the task's
    instruction: str | None = None  # wording put before the prompt, then a blank line
    shots: int | None = Field(None, ge=0, le=64)  # build the prompt from this many gold shots instead of the template's
    selection: Literal["fixed", "balanced", "nearest"] = "fixed"  # how those shots are chosen
    shot_template: str | None = None  # how a shot and the question are written (default: the task's student template)
    constrain: bool = False  # the answer is constrained to the task's labels
    temperature: float | None = Field(None, ge=0.0)  # default: the task's generation temperature
    votes: int = Field(1, ge=1, le=32)  # >1: the majority of this many samples at vote_temperature
    vote_temperature: float = Field(0.7, gt=0.0)
    seed: int = 0  # the shuffle fixed and balanced shots are taken from

    def problems(self, task: Task) -> list[str]:
        """What makes this variant unusable for ``task``, each with its field and fix."""
        found = []
        if self.template is not None:
            found += [f"teacher_variant.template {problem}" for problem in prompts.check(self.template, task.input_fields)]
            if self.shots is not None:
                found.append("teacher_variant.template brings its own shots; drop template or shots")
        if self.shot_template is not None:
            found += [f"teacher_variant.shot_template {problem}" for problem in prompts.check(self.shot_template, task.input_fields)]
            if self.shots is None:
                found.append("teacher_variant.shot_template writes gold shots; set shots too, or drop shot_template")
        if self.constrain and task.output.type != "labels":
            found.append(f"teacher_variant.constrain needs a label task; task {task.name!r} outputs {task.output.type}")
        if self.selection != "fixed" and not self.shots:
            found.append(f"teacher_variant.selection {self.selection} chooses gold shots; set shots too (in a variant, build on one with base:)")
        if self.selection == "balanced" and task.output.type != "labels":
            found.append("teacher_variant.selection balanced needs a label task; choose fixed or nearest")
        return found

    @property
    def uses_shots(self) -> bool:
        """Whether prompts are built from gold shots (a :class:`~training.shots.ShotPool` is needed)."""
        return bool(self.shots)

    def prompt(self, task: Task, row: Row, pool: ShotPool | None = None) -> str:
        """The teacher's prompt for ``row``."""
        if self.shots is None:
            body = Template(self.template).render(row.inputs) if self.template is not None else task.teacher_prompt(row.inputs)
        else:
            question = Template(self.shot_template or task.student_template)
            chosen = pool.choose(row, self.shots, self.selection) if self.shots else []
            examples = [question.render(shot.inputs) + task.completion(shot.gold) for shot in chosen]
            body = "\n\n".join([*examples, question.render(row.inputs)])
        return f"{self.instruction.strip()}\n\n{body}" if self.instruction else body

    def generation(self, task: Task, protocol: Protocol) -> Generation:
        """The generation settings of one request (a vote's sample is drawn at ``vote_temperature``)."""
        update: dict = {}
        if self.votes > 1:
            update["temperature"] = self.vote_temperature
        elif self.temperature is not None:
            update["temperature"] = self.temperature
        if self.constrain:
            update["max_new_tokens"] = max(task.generation.max_new_tokens, _CONSTRAINED_TOKENS[protocol])
        return task.generation.model_copy(update=update)

    def constraint(self, task: Task, protocol: Protocol) -> dict | None:
        """The extra request fields that constrain the answer to the labels (None when unconstrained).

        OpenAI: ``{"guided_choice": labels}`` (vLLM's field). LoRAX: ``response_format`` with a JSON
        schema ``{"label": enum}``, as lorax-client's ``generate(response_format=...)`` sends it.
        """
        if not self.constrain:
            return None
        labels = list(task.output.labels)
        if protocol == "openai":
            return {"guided_choice": labels}
        schema = {"type": "object", "properties": {"label": {"type": "string", "enum": labels}}, "required": ["label"]}
        return {"response_format": {"type": "json_object", "schema": schema}}

    def read(self, text: str) -> str:
        """The answer as the task parses it: a constrained JSON answer's ``label``, else the text stripped."""
        text = text.strip()
        if self.constrain and text.startswith("{"):
            try:
                document = json.loads(text)
            except json.JSONDecodeError:
                return text
            if isinstance(document, dict) and isinstance(document.get("label"), str):
                return document["label"]
        return text

    def changes(self) -> dict:
        """The fields set away from the task's teacher (name excluded): what lineage records."""
        return self.model_dump(exclude={"name"}, exclude_defaults=True)


def vote(task: Task, answers: list[str]) -> tuple[str, float]:
    """The majority answer (labels compared as parsed; first sampled among equals) and its share of the votes."""
    keys = []
    for answer in answers:
        parsed = task.parse(answer)
        keys.append(parsed.value if parsed.code == "ok" and isinstance(parsed.value, str) else answer.strip())
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    winner = max(counts, key=lambda key: (counts[key], -keys.index(key)))
    return winner, counts[winner] / len(keys)
