"""An LLM judge: any LoRAX or OpenAI endpoint asked to score an output with a number.

Used twice: by curation's ranking step (score each training row's teacher output, keep the best)
and by evaluation (a task's ``judge`` criterion, scored on the endpoint under test's outputs).
A judge prompt is a ``serving.prompts`` template with ``{{input}}`` and ``{{output}}`` and, where a
gold or teacher answer exists, ``{{reference}}``. The judge is asked greedily for a few tokens; the
first number in its answer is the score.
"""

from __future__ import annotations

import re
from functools import lru_cache

from serving import prompts
from serving.prompts import Template, TemplateProblem
from training.task import Generation

# The judge answers with a number; a few tokens are enough and greedy decoding keeps it stable.
GENERATION = Generation(max_new_tokens=8, stop=["\n"], temperature=0.0)
FIELDS = ("input", "output", "reference")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def check_prompt(template: str) -> list[TemplateProblem]:
    """What is wrong with a judge prompt: it must use ``{{input}}`` and ``{{output}}``; ``{{reference}}`` is optional."""
    return prompts.check(template, FIELDS, required=("input", "output"))


def render_prompt(template: str, input_text: str, output: str, reference: str = "") -> str:
    """``template`` with ``{{input}}``, ``{{output}}`` and ``{{reference}}`` filled in (single braces are literal text)."""
    return _template(template).render({"input": input_text, "output": output, "reference": reference})


@lru_cache(maxsize=16)
def _template(text: str) -> Template:
    """The judge prompt, refused when it names a field the judge has no value for (every row renders the same one)."""
    problems = prompts.check(text, FIELDS, required=())
    if problems:
        raise prompts.TemplateError("judge prompt " + "; ".join(str(problem) for problem in problems))
    return Template(text)


def parse_score(text: str) -> float | None:
    """The first number in a judge's answer, or None."""
    match = _NUMBER.search(text or "")
    return float(match.group()) if match else None
