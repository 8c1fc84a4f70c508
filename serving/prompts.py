"""Prompt templates: the one placeholder syntax of task prompts, route templates and judge prompts.

A template is text with ``{{field}}`` placeholders (``{{ field }}`` works too). Single braces are
literal text, so a few-shot example written in JSON needs no escaping::

    {"review": "Great soup."} -> positive
    {"review": "{{review}}"} ->

has one field, ``review``. ``Template.render`` fills the fields in; ``Template.match`` is its
inverse, recovering the fields from a rendered prompt (how a logged request becomes a training
row). ``check`` compares a template with the fields its owner fills, and flags ``{field}`` in single
braces: literal text under this syntax, so almost always a ``{{field}}`` with a brace missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class TemplateError(ValueError):
    """A template cannot be rendered with the values given."""


@dataclass(frozen=True)
class Template:
    """Prompt text with ``{{field}}`` placeholders."""

    text: str

    @cached_property
    def _pieces(self) -> tuple[tuple[str, str | None], ...]:
        """The text as (literal, field) pairs in order; the last pair's field is None."""
        pieces, start = [], 0
        for placeholder in _PLACEHOLDER.finditer(self.text):
            pieces.append((self.text[start : placeholder.start()], placeholder.group(1)))
            start = placeholder.end()
        pieces.append((self.text[start:], None))
        return tuple(pieces)

    @property
    def fields(self) -> tuple[str, ...]:
        """The placeholder names, each once, in order of first use."""
        return tuple(dict.fromkeys(field for _, field in self._pieces if field))

    def render(self, values: Mapping[str, object]) -> str:
        """The text with every placeholder replaced by ``str(values[field])``; extra values are ignored."""
        missing = [field for field in self.fields if field not in values]
        if missing:
            raise TemplateError(f"no value for {_names(missing)}; pass a value for every field of the template {list(self.fields)}")
        return "".join(literal + (str(values[field]) if field else "") for literal, field in self._pieces)

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        parts, seen = [], set()
        for literal, field in self._pieces:
            parts.append(re.escape(literal))
            if field:
                # Lazy, so a field stops at the first place the literal text after it matches.
                parts.append(f"(?P={field})" if field in seen else f"(?P<{field}>.*?)")
                seen.add(field)
        return re.compile("".join(parts), re.DOTALL)

    def match(self, text: str) -> dict[str, str] | None:
        """The field values that render to exactly ``text``, or None when the template cannot produce it."""
        found = self._regex.fullmatch(text)
        return found.groupdict() if found else None


@dataclass(frozen=True)
class TemplateProblem:
    """One thing wrong with a template: what (said of the template) and how to fix it."""

    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}"


def check(text: str, fields: Iterable[str], required: Iterable[str] | None = None) -> list[TemplateProblem]:
    """What is wrong with template ``text`` whose owner fills ``fields``.

    Args:
        text: the template.
        fields: the names its owner has values for; any other placeholder is unknown.
        required: the fields it must use (default: all of ``fields``).

    Returns:
        Problems whose messages read after the template's name, e.g. "student_template" + " uses ...":
        unknown placeholders, required fields never used, and ``{field}`` in single braces.
    """
    fields = list(fields)
    required = fields if required is None else list(required)
    template = Template(text)
    problems = []
    unknown = [field for field in template.fields if field not in fields]
    if unknown:
        problems.append(TemplateProblem(f"uses {unknown}, which {'is' if len(unknown) == 1 else 'are'} not among its fields {fields}",
                                        "correct the placeholder or declare the field"))
    literal_text = [literal for literal, _ in template._pieces]
    single = [field for field in fields if any(re.search(r"(?<!\{)\{" + re.escape(field) + r"\}(?!\})", part) for part in literal_text)]
    for field in single:
        problems.append(TemplateProblem(f"has {{{field}}} in single braces, which is literal text", f"write {{{{{field}}}}}"))
    for field in required:
        if field not in template.fields and field not in single:
            problems.append(TemplateProblem(f"never uses {{{{{field}}}}}", f"add {{{{{field}}}}} where its value goes"))
    return problems


def _names(fields: list[str]) -> str:
    return ", ".join("{{" + field + "}}" for field in fields)
