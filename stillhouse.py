"""The `stillhouse` command: one console script, one subcommand family per package.

Each package that has commands exposes ``cli.register(subparsers)``; this module only
wires them together, so `stillhouse --help` lists everything the platform can do.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Packages whose ``cli`` module contributes subcommands, in the order `--help` lists them.
COMMAND_MODULES = ["serving.cli", "training.cli", "abtest.cli", "monitoring.cli", "loop.cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stillhouse",
        description="Distil LLMs into servable LoRA adapters, serve them, and A/B test them.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
