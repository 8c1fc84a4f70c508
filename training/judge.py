"""An LLM judge: any LoRAX or OpenAI endpoint asked to score an output with a number.

Used twice: by curation's ranking step (score each training row's teacher output, keep the best)
and by evaluation (a task's ``judge`` criterion, scored on the endpoint under test's outputs).
The judge is asked greedily for a few tokens; the first number in its answer is the score.
"""

from __future__ import annotations

import re

from training.task import Generation

# The judge answers with a number; a few tokens are enough and greedy decoding keeps it stable.
GENERATION = Generation(max_new_tokens=8, stop=["\n"], temperature=0.0)
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_PLACEHOLDER = re.compile(r"\{(input|output|reference)\}")


def render_prompt(template: str, input_text: str, output: str, reference: str = "") -> str:
    """``template`` with ``{input}``, ``{output}`` and ``{reference}`` filled in (other braces are left as they are)."""
    values = {"input": input_text, "output": output, "reference": reference}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def parse_score(text: str) -> float | None:
    """The first number in a judge's answer, or None."""
    match = _NUMBER.search(text or "")
    return float(match.group()) if match else None
