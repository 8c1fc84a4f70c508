"""deploy/Dockerfile: the image holds every package pyproject.toml installs, and the build context
(cut down by Dockerfile.dockerignore) holds every file the Dockerfile copies."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy" / "Dockerfile"


def _copied() -> set[str]:
    sources = set()
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            sources |= set(shlex.split(line)[1:-1])
    return sources


def test_the_image_installs_every_package():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]}
    modules = {f"{name}.py" for name in setuptools["py-modules"]}
    assert packages | modules | {"pyproject.toml", "README.md"} <= _copied()


def test_the_build_context_holds_what_the_dockerfile_copies():
    lines = [line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()]
    assert "*" in lines, "the ignore file lists what to send, after excluding everything"
    sent = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for source in _copied():
        assert (REPO / source).exists() and source in sent, source
