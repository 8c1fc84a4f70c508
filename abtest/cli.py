"""`stillhouse route`: the A/B router in front of inference servers."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


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
    route.add_argument("--request-log", type=Path, default=None, help="SQLite file recording every exchange and its feedback")
    route.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    route.add_argument("--reload-interval", type=float, default=1.0, help="seconds between checks of the config file")
    route.set_defaults(handler=_route)
    check = subparsers.add_parser("route-check", help="validate a traffic-split file and print its version (exit 1 if invalid)")
    check.add_argument("config", type=Path)
    check.set_defaults(handler=_route_check)


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
    print(f"routing on http://{args.host}:{args.port} (config version {router.holder.config.version_hash})", file=sys.stderr)
    # No access log: the request log records every exchange, and a line per request costs latency.
    uvicorn.run(create_app(router), host=args.host, port=args.port, log_level="info", access_log=False)
    return 0
