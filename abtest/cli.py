"""`stillhouse route`: the A/B router in front of inference servers."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from serving.cli import add_request_log_flag, request_log_ready


def register(subparsers: argparse._SubParsersAction) -> None:
    route = subparsers.add_parser("route", help="run the A/B router (LoRAX + OpenAI APIs) from a traffic-split file")
    route.add_argument("--config", type=Path, required=True, help="traffic-split YAML (see abtest/examples/traffic.yaml)")
    route.add_argument("--host", default="127.0.0.1")
    route.add_argument("--port", type=int, default=8090)
    route.add_argument(
        "--admin-token",
        default=os.environ.get("STILLHOUSE_ADMIN_TOKEN"),
        help="bearer token for /admin/* (default: $STILLHOUSE_ADMIN_TOKEN; unset disables the admin API)",
    )
    route.add_argument(
        "--api-key",
        action="append",
        default=[k for k in os.environ.get("STILLHOUSE_API_KEYS", "").split(",") if k],
        help="a client API key callers must send as a bearer token (repeatable; default: $STILLHOUSE_API_KEYS, comma-separated)",
    )
    add_request_log_flag(route, "records every exchange and its feedback")
    route.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    route.add_argument("--reload-interval", type=float, default=1.0, help="seconds between checks of the config file")
    route.set_defaults(handler=_route)
    check = subparsers.add_parser("route-check", help="validate a traffic-split file and print its version (exit 1 if invalid)")
    check.add_argument("config", type=Path)
    check.set_defaults(handler=_route_check)
    _register_abtest(subparsers)


def _route_check(args: argparse.Namespace) -> int:
    from abtest import config

    try:
        loaded = config.load(args.config)
    except config.ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"valid: {args.config} (version {loaded.version_hash}, routes: {', '.join(loaded.routes) or 'none'})")
    return 0


def _route(args: argparse.Namespace) -> int:
    import uvicorn

    from abtest.config import ConfigError
    from abtest.router import Router, RouterSettings, create_app

    settings = RouterSettings(
        config_path=args.config,
        admin_token=args.admin_token,
        api_keys=frozenset(args.api_key),
        request_log=args.request_log,
        max_body_bytes=args.max_body_bytes,
        reload_interval_s=args.reload_interval,
    )
    try:
        router = Router(settings)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    if not request_log_ready(args.request_log):
        return 1
    print(f"routing on http://{args.host}:{args.port} (config version {router.holder.config.version_hash})", file=sys.stderr)
    # No access log: the request log records every exchange, and a line per request costs latency.
    uvicorn.run(create_app(router), host=args.host, port=args.port, log_level="info", access_log=False)
    return 0


# --- abtest analyze | watch -------------------------------------------------------------------


def _add_source_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--route", required=True, help="the route to analyse (a key of routes: in the traffic-split file)")
    parser.add_argument("--config", type=Path, required=True, help="traffic-split YAML with the route's experiment: plan")
    parser.add_argument("--candidate", default=None, help="candidate arm to judge (default: the serving candidate with the most weight)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prometheus", metavar="URL", help="read the router's series from this Prometheus (http://HOST:9090)")
    source.add_argument("--metrics-url", metavar="URL",
                        help="no Prometheus: scrape this router /metrics on every look into --state and read the snapshots")
    parser.add_argument("--state", type=Path, default=None,
                        help="snapshot file for --metrics-url (default: $STILLHOUSE_HOME/abtest/ROUTE.jsonl)")


def _register_abtest(subparsers: argparse._SubParsersAction) -> None:
    abtest = subparsers.add_parser("abtest", help="analyse an A/B test and roll a candidate out")
    sub = abtest.add_subparsers(dest="abtest_command", metavar="ACTION", required=True)
    analyze = sub.add_parser("analyze", help="SRM, metrics, guardrails and a verdict (promote, rollback, continue, inconclusive)")
    _add_source_flags(analyze)
    analyze.add_argument("--window", default="1h", help="how far back to look: 90s, 30m, 1h, 2d (default 1h)")
    analyze.add_argument("--unit", choices=["request", "bucket"], default="request",
                         help="one observation per request (default), or per time bucket: its mean (batch means, for sticky users)")
    analyze.add_argument("--bucket", default="1m", help="with --unit bucket: the bucket length (default 1m)")
    analyze.add_argument("--json", action="store_true", help="print the analysis as one JSON object")
    analyze.add_argument("--html", type=Path, default=None, help="also write a self-contained HTML report with plots here")
    analyze.set_defaults(handler=_abtest_analyze)
    watch = sub.add_parser("watch", help="ramp the candidate through experiment.ramp.steps; roll back at once on a breach")
    _add_source_flags(watch)
    watch.add_argument("--interval", type=float, default=30.0, help="seconds between looks (default 30)")
    watch.add_argument("--decision-log", type=Path, default=None, help="JSONL file each decision is appended to "
                       "(default: $STILLHOUSE_HOME/abtest/ROUTE-decisions.jsonl)")
    watch.add_argument("--dry-run", action="store_true", help="decide and log, but never write the traffic-split file")
    watch.add_argument("--max-looks", type=int, default=None, help="stop after this many looks (default: until promoted or rolled back)")
    watch.add_argument("--metrics-port", type=int, default=None, help="serve the stillhouse_rollout_* metrics on this loopback port")
    watch.set_defaults(handler=_abtest_watch)


def parse_duration(text: str, flag: str) -> float:
    """Seconds in ``90s``, ``30m``, ``1h`` or ``2d``; a bad value exits naming ``flag``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value, unit = float(text[:-1]), units[text[-1]]
    except (ValueError, KeyError, IndexError):
        raise SystemExit(f"{flag} {text!r}: write a number and a unit, e.g. 90s, 30m, 1h or 2d") from None
    if value <= 0:
        raise SystemExit(f"{flag} {text!r} must be positive")
    return value * unit


def _source(args: argparse.Namespace):
    from monitoring.prometheus import Prometheus, PrometheusSource
    from monitoring.snapshots import ScrapingSource
    from serving.base_models import stillhouse_home

    if args.prometheus:
        return PrometheusSource(Prometheus(args.prometheus))
    state = args.state or stillhouse_home() / "abtest" / f"{args.route}.jsonl"
    return ScrapingSource(args.metrics_url.rstrip("/") + ("" if args.metrics_url.endswith("/metrics") else "/metrics"), state)


def _look(source) -> None:
    if (problem := source.look()) is not None:
        print(f"warning: {problem}; analysing the snapshots already taken", file=sys.stderr)


def _abtest_analyze(args: argparse.Namespace) -> int:
    import json
    import time

    from abtest import config
    from abtest.analysis import analyze_route, format_text
    from abtest.report import write_html

    try:
        loaded = config.load(args.config)
    except config.ConfigError as error:
        print(error, file=sys.stderr)
        return 1
    window = parse_duration(args.window, "--window")
    source = _source(args)
    _look(source)
    end = time.time()
    try:
        result, history = analyze_route(loaded, args.route, source, end - window, end, args.candidate, points=20 if args.html else 0,
                                        bucket_s=parse_duration(args.bucket, "--bucket") if args.unit == "bucket" else None)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json(), indent=2) if args.json else format_text(result))
    if args.html:
        path = write_html(args.html, result, history, loaded.routes[args.route].weights())
        print(f"report: {path.resolve()}", file=sys.stderr)
    return 0


def _abtest_watch(args: argparse.Namespace) -> int:
    import time

    from prometheus_client import start_http_server

    from abtest import config
    from abtest.rollout import ROLLED_BACK, Watch
    from monitoring.metrics import RolloutMetrics
    from serving.base_models import stillhouse_home

    source = _source(args)
    log = args.decision_log or stillhouse_home() / "abtest" / f"{args.route}-decisions.jsonl"
    metrics = RolloutMetrics()
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, addr="127.0.0.1", registry=metrics.registry)
    try:
        watch = Watch(args.config, args.route, source, args.candidate, log, dry_run=args.dry_run, metrics=metrics)
    except (config.ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"watching {args.route}: {watch.candidate} at {watch.weight:g}%, steps {watch.plan.ramp.steps}, "
          f"decisions in {log}{' (dry run)' if args.dry_run else ''}", file=sys.stderr)
    _look(source)
    decision = watch.start()
    looks = 0
    while True:
        print(f"{decision.action}: {watch.candidate} at {decision.weight:g}% — {'; '.join(decision.reasons)}", flush=True)
        if decision.final or (args.max_looks is not None and looks >= args.max_looks):
            break
        time.sleep(args.interval)
        _look(source)
        decision = watch.look()
        looks += 1
    return 3 if decision.action == ROLLED_BACK else 0
