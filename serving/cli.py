"""`stillhouse serve | models | adapters`: the serving commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from serving.engines import ENGINES
from serving.engines.precision import DTYPES

if TYPE_CHECKING:
    from serving.service import ServeSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_models(subparsers)
    _register_adapters(subparsers)
    _register_serve(subparsers)
    _register_engines(subparsers)


# --- models -------------------------------------------------------------------------------


def _register_models(subparsers: argparse._SubParsersAction) -> None:
    models = subparsers.add_parser("models", help="list and provision base models")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="known base models and whether they are cached")
    listing.set_defaults(handler=_models_list)
    path = sub.add_parser("path", help="print the local HF checkpoint directory of a base (provisions it)")
    path.add_argument("name", help="gemma-3-270m, tiny, or a local HF model directory")
    path.set_defaults(handler=_models_path)


def _models_list(args: argparse.Namespace) -> int:
    from serving import base_models

    for status in base_models.list_bases():
        state = "cached" if status.cached else "not cached"
        print(f"{status.name:<16} {state:<11} {status.path}  {status.description}")
    return 0


def _models_path(args: argparse.Namespace) -> int:
    from serving import base_models

    print(base_models.provision(args.name))
    return 0


# --- adapters -----------------------------------------------------------------------------


def _add_registry_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", type=Path, default=None, help="registry directory (default: $STILLHOUSE_HOME/registry)")


def _register_adapters(subparsers: argparse._SubParsersAction) -> None:
    adapters = subparsers.add_parser("adapters", help="check adapters and manage the adapter registry")
    sub = adapters.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)

    check = sub.add_parser("check", help="check that a LoRA adapter directory is servable (exit 1 if not)")
    check.add_argument("path", type=Path)
    check.add_argument("--profile", default="strict", help="lorax, vllm or strict (default)")
    check.add_argument("--base", default="gemma-3-270m", help="the base it will be served on: a name or a local HF model directory")
    check.set_defaults(handler=_adapters_check)

    add = sub.add_parser("add", help="copy a servable adapter into the registry as a new version")
    add.add_argument("path", type=Path)
    add.add_argument("--name", required=True)
    add.add_argument("--profile", default="strict", help="lorax, vllm or strict (default)")
    add.add_argument("--base", default="gemma-3-270m", help="the base it will be served on: a name or a local HF model directory")
    _add_registry_flag(add)
    add.set_defaults(handler=_adapters_add)

    listing = sub.add_parser("list", help="every adapter version in the registry")
    _add_registry_flag(listing)
    listing.set_defaults(handler=_adapters_list)

    show = sub.add_parser("show", help="metadata of NAME (latest) or NAME@vN")
    show.add_argument("adapter_id")
    _add_registry_flag(show)
    show.set_defaults(handler=_adapters_show)

    rm = sub.add_parser("rm", help="remove NAME (all versions) or NAME@vN")
    rm.add_argument("adapter_id")
    _add_registry_flag(rm)
    rm.set_defaults(handler=_adapters_rm)


def _adapters_check(args: argparse.Namespace) -> int:
    from serving import base_models, servability

    base_dir = base_models.provision(args.base)
    violations = servability.check_adapter(args.path, base_dir, profile=args.profile, base_name=args.base)
    if not violations:
        print(f"servable ({args.profile} profile, base {args.base}): {args.path}")
        return 0
    print(f"not servable ({args.profile} profile, base {args.base}): {args.path}", file=sys.stderr)
    print("\n".join(servability.report_lines(violations)), file=sys.stderr)
    return 1


def _open_registry(args: argparse.Namespace):
    from serving.registry import Registry, default_registry_dir

    return Registry(args.registry or default_registry_dir())


def _adapters_add(args: argparse.Namespace) -> int:
    from serving import base_models, servability
    from serving.registry import NotServableError

    base_dir = base_models.provision(args.base)
    try:
        entry = _open_registry(args).add(args.path, args.name, base_dir=base_dir, profile=args.profile)
    except NotServableError as error:
        print(f"refused: {error.message}", file=sys.stderr)
        print("\n".join(servability.report_lines(error.violations)), file=sys.stderr)
        return 1
    print(f"added {entry.id} ({entry.path})")
    return 0


def _adapters_list(args: argparse.Namespace) -> int:
    entries = _open_registry(args).list()
    if not entries:
        print("the registry is empty; add one with `stillhouse adapters add PATH --name NAME`")
    for entry in entries:
        meta = entry.metadata
        print(f"{entry.id:<32} r={meta.get('rank')} base={meta.get('base_model')} created={meta.get('created')}")
    return 0


def _adapters_show(args: argparse.Namespace) -> int:
    from serving.errors import ServingError

    try:
        entry = _open_registry(args).resolve(args.adapter_id)
    except ServingError as error:
        print(error.message, file=sys.stderr)
        return 1
    print(json.dumps({"id": entry.id, "path": str(entry.path), **entry.metadata}, indent=2, default=str))
    return 0


def _adapters_rm(args: argparse.Namespace) -> int:
    from serving.errors import ServingError

    try:
        removed = _open_registry(args).remove(args.adapter_id)
    except ServingError as error:
        print(error.message, file=sys.stderr)
        return 1
    for entry in removed:
        print(f"removed {entry.id}")
    return 0


# --- serve --------------------------------------------------------------------------------


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", default="gemma-3-270m", help="gemma-3-270m (default), tiny, or a local HF model directory")
    _add_registry_flag(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--engine", choices=ENGINES, default="torch",
        help="inference engine: torch (default, in-process), vllm (a vLLM server from .venv-vllm, our child), "
        "or peft (a baseline for benchmarks: HF generate with peft's mixed-adapter batches)",
    )  # fmt: skip
    parser.add_argument("--engine-url", default=None, help="with --engine vllm: attach to this running vLLM server instead of launching one")
    parser.add_argument("--profile", default="strict", help="servability profile adapters must pass: strict (default), lorax, vllm")
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("STILLHOUSE_ADMIN_TOKEN"),
        help="bearer token for /admin/* and /v1/(un)load_lora_adapter (default: $STILLHOUSE_ADMIN_TOKEN; unset disables them)",
    )
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting or running before 429 overloaded")
    parser.add_argument(
        "--max-active-adapters", type=_positive_int, default=8,
        help="adapter slots: adapters applied in the same batch at once (least recently used are evicted)",
    )  # fmt: skip
    parser.add_argument(
        "--max-resident-adapters", type=_positive_int, dest="max_active_adapters", action=_Deprecated, default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )  # fmt: skip
    parser.add_argument(
        "--pin-adapter", action="append", default=[], metavar="ADAPTER_ID",
        help="load this registry adapter at start-up and keep it in an active slot, never evicted (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--max-cpu-adapters", type=int, default=64, help="torch engine: adapters kept in CPU memory for a fast reload (LRU)"
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto",
        help="compute dtype of every engine: auto (default: bfloat16 where the hardware computes it natively, else float32)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch and peft engines: compute threads (default: the cores they may use)")
    parser.add_argument("--default-max-new-tokens", type=int, default=256, help="used when a request leaves max_new_tokens unset")
    parser.add_argument("--max-total-tokens", type=int, default=None, help="prompt + new tokens limit (default: the model's, at most 8192)")


class _Deprecated(argparse.Action):
    """An old flag name that still works, with a warning naming the new one."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{option_string} is deprecated; use --{self.dest.replace('_', '-')}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _register_serve(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="serve the base model and registry adapters (LoRAX + OpenAI APIs)")
    _add_server_flags(serve)
    add_request_log_flag(serve, "records every exchange (the training data source)")
    serve.add_argument(
        "--max-body-bytes", type=_positive_int, default=None,
        help="refuse request bodies larger than this with 413 (default: 1 MiB, far above what a prompt of the model's context needs)",
    )  # fmt: skip
    serve.set_defaults(handler=_serve)


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) == 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return int(value)


def add_request_log_flag(parser: argparse.ArgumentParser, records: str) -> None:
    """`--request-log` for `serve` and `route`: a SQLite file, or a PostgreSQL database replicas share."""
    parser.add_argument(
        "--request-log", type=_request_log_target, default=None, metavar="PATH|URL",
        help=f"{records}: a SQLite file, or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE (postgres:// too) "
        "that several replicas share; the password may come from $PGPASSWORD or ~/.pgpass instead",
    )  # fmt: skip


def _request_log_target(value: str) -> Path | str:
    from serving.request_log import RequestLogError, parse_target  # here: psycopg would slow every command's start-up

    try:
        return parse_target(value)
    except RequestLogError as error:
        raise argparse.ArgumentTypeError(str(error)) from error  # argparse prints it after the flag's name


def request_log_ready(target: Path | str | None) -> bool:
    """Open the `--request-log` store once before serving, so a bad one fails at start-up naming the flag; prints why."""
    if target is None:
        return True
    from serving.request_log import RequestLogError, open_store

    try:
        open_store(target).close()
    except RequestLogError as error:
        print(f"--request-log: {error}", file=sys.stderr)
        return False
    return True


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """The settings the `serve` flags describe."""
    from serving.service import DEFAULT_MAX_BODY_BYTES, ServerSettings, ServeSettings

    server = ServerSettings(
        profile=args.profile,
        admin_token=args.admin_token,
        default_max_new_tokens=args.default_max_new_tokens,
        request_log=args.request_log,
        max_body_bytes=args.max_body_bytes or DEFAULT_MAX_BODY_BYTES,
        pinned_adapters=tuple(args.pin_adapter),
    )
    return ServeSettings(
        base=args.base,
        registry=args.registry,
        engine=args.engine,
        engine_url=args.engine_url,
        max_queue=args.max_queue,
        max_active_adapters=args.max_active_adapters,
        max_cpu_adapters=args.max_cpu_adapters,
        max_total_tokens=args.max_total_tokens,
        dtype=args.dtype,
        threads=args.threads,
        server=server,
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    if not request_log_ready(args.request_log):  # before the engine's imports: a bad flag fails in a moment
        return 1
    from serving.server import create_app
    from serving.service import build_service

    service = build_service(serve_settings(args))
    problems = service.pin_problems()  # before the engine loads: a bad id fails in a moment
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    app = create_app(service)
    print(f"serving on http://{args.host}:{args.port} (LoRAX: POST /, /generate; OpenAI: /v1/...)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


# --- engines ------------------------------------------------------------------------------


def _register_engines(subparsers: argparse._SubParsersAction) -> None:
    engines = subparsers.add_parser("engines", help="install optional inference engines")
    sub = engines.add_subparsers(dest="engines_command", metavar="ACTION", required=True)
    install = sub.add_parser("install", help="create the engine's own venv (vllm: .venv-vllm, pinned; skipped when healthy)")
    install.add_argument("engine", choices=["vllm"])
    install.add_argument("--force", action="store_true", help="reinstall even when the venv is healthy")
    install.set_defaults(handler=_engines_install)


def _engines_install(args: argparse.Namespace) -> int:
    from serving.engines import vllm_install

    try:
        vllm_install.install(force=args.force)
    except RuntimeError as error:
        print(f"install failed: {error}", file=sys.stderr)
        return 1
    return 0
