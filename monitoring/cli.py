"""`stillhouse dashboards build [--check]`: the Grafana dashboards and Prometheus rules, generated from code."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    dashboards = subparsers.add_parser("dashboards", help="build the Grafana dashboards and Prometheus rules from code")
    sub = dashboards.add_subparsers(dest="dashboards_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="write monitoring/dashboards/json/*.json and monitoring/prometheus/rules/*.yml")
    build.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed file is stale")
    build.set_defaults(handler=_build)


def _build(args: argparse.Namespace) -> int:
    from monitoring import dashboards
    from monitoring.rules import RULES_PATH, rules_yaml

    if args.check:
        stale = [f"dashboard {uid}" for uid in dashboards.stale()]
        if not RULES_PATH.exists() or RULES_PATH.read_text() != rules_yaml():
            stale.append(f"rules {RULES_PATH.name}")
        if stale:
            print(f"stale: {', '.join(stale)}; run `stillhouse dashboards build` and commit the result", file=sys.stderr)
            return 1
        print("dashboards and rules are current")
        return 0
    for path in dashboards.build():
        print(f"wrote {path}")
    RULES_PATH.parent.mkdir(parents=True, exist_ok=True)
    RULES_PATH.write_text(rules_yaml())
    print(f"wrote {RULES_PATH}")
    return 0
