"""deploy/compose: the Compose file as Compose reads it (variables from .env interpolated) and its checks.

The Compose Specification's JSON schema is the one check-jsonschema ships (vendored from the
compose-spec project and refreshed with each release), so no schema file is copied here.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib.resources import files
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"

# $$ is a literal $; ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+alt}; $NAME.
_REFERENCE = re.compile(r"\$(?:(?P<escape>\$)|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_]\w*))")


def variables(text: str) -> dict[str, set[str]]:
    """Every variable ``text`` references, with the operators it is used with ('' for a plain reference)."""
    found: dict[str, set[str]] = {}
    for match in _REFERENCE.finditer(text):
        name = match["name"] or match["bare"]
        if name:
            found.setdefault(name, set()).add(match["op"] or "")
    return found


def interpolate(value: object, env: dict[str, str]) -> object:
    """``value`` with every string interpolated as Compose does; a missing required variable raises ValueError."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escape"]:
            return "$"
        name, op, arg = match["name"] or match["bare"], match["op"] or "", match["arg"] or ""
        current = env.get(name)
        present = current is not None and (current != "" or not op.startswith(":"))
        if op.endswith("-"):
            return current if present else arg
        if op.endswith("?"):
            if not present:
                raise ValueError(f"{name}: {arg}")
            return current
        if op.endswith("+"):
            return arg if present else ""
        return current or ""

    return _REFERENCE.sub(substitute, value)


def env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """``NAME=value`` lines of a .env file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path}: {line!r} is not NAME=value"
            values[name.strip()] = value.strip()
    return values


def loaded(env: dict[str, str], path: Path = COMPOSE_FILE) -> dict:
    """The Compose file after YAML parsing (anchors and merge keys resolved) and interpolation with ``env``."""
    return interpolate(yaml.safe_load(path.read_text()), env)


@cache
def specification() -> dict:
    """The Compose Specification's JSON schema, as check-jsonschema vendors it."""
    return json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())


def schema_errors(document: dict) -> list[str]:
    """Every place ``document`` breaks the Compose Specification, as 'path: message'."""
    validator = jsonschema.Draft202012Validator(specification())
    return [f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}" for error in validator.iter_errors(document)]


def example_env() -> dict[str, str]:
    """.env.example's values, with a stand-in for each secret it leaves blank for the user to fill."""
    required = {name for name, ops in variables(COMPOSE_FILE.read_text()).items() if any(op.endswith("?") for op in ops)}
    return {name: value or (f"example-{name.lower()}" if name in required else value) for name, value in env_file().items()}


def validate(path: Path = COMPOSE_FILE) -> None:
    """Loader for shipped Compose files: interpolated with .env.example, it must match the specification."""
    errors = schema_errors(loaded(example_env(), path))
    assert not errors, f"{path} breaks the Compose Specification:\n" + "\n".join(errors)
