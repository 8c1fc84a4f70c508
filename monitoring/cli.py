"""`stillhouse dashboards build [--check]` (dashboards and rules from code) and `stillhouse up` (the local stack)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLE_TRAFFIC = Path(__file__).resolve().parents[1] / "abtest" / "examples" / "traffic.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    dashboards = subparsers.add_parser("dashboards", help="build the Grafana dashboards and Prometheus rules from code")
    sub = dashboards.add_subparsers(dest="dashboards_command", metavar="ACTION", required=True)
    build = sub.add_parser("build", help="write monitoring/dashboards/json/*.json and monitoring/prometheus/rules/*.yml")
    build.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed file is stale")
    build.set_defaults(handler=_build)

    up = subparsers.add_parser("up", help="run the server, the router and (when installed) Prometheus on this machine")
    up.add_argument("--traffic", type=Path, default=EXAMPLE_TRAFFIC, help=f"traffic-split file for the router (default: {EXAMPLE_TRAFFIC})")
    up.add_argument("--base", default="gemma-3-270m", help="gemma-3-270m (default), tiny, or a local HF model directory")
    up.add_argument("--registry", type=Path, default=None, help="adapter registry (default: $STILLHOUSE_HOME/registry)")
    up.add_argument("--server-port", type=int, default=8080)
    up.add_argument("--router-port", type=int, default=8090)
    up.add_argument("--prometheus-port", type=int, default=9090)
    up.add_argument("--state-dir", type=Path, default=Path(".stillhouse/up"), help="logs, request logs and Prometheus data")
    up.set_defaults(handler=_up)


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


def _up(args: argparse.Namespace) -> int:
    from monitoring.stack import StackSettings, run

    if not args.traffic.is_file():
        print(f"error: --traffic {args.traffic} does not exist; start from {EXAMPLE_TRAFFIC}", file=sys.stderr)
        return 1
    return run(StackSettings(traffic=args.traffic, base=args.base, state_dir=args.state_dir, server_port=args.server_port,
                             router_port=args.router_port, prometheus_port=args.prometheus_port, registry=args.registry))
