"""`stillhouse demo [--quick]`: the whole loop, a progress line per stage and a summary at the end."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="the whole loop: log a teacher, distil a student, A/B test it and decide (--quick: tiny model, minutes)",
        description="Starts the server, the router and Prometheus (when installed); sends simulated users' traffic to the "
                    "few-shot teacher; builds, curates and trains a zero-shot LoRA student from the request log; ramps it "
                    "in with `abtest watch`; prints the verdict and writes the HTML report and the Grafana dashboards.",
    )
    demo.add_argument("--quick", action="store_true", help="the same stages at tiny scale on the tiny random model (CI)")
    demo.add_argument("--state-dir", type=Path, default=None,
                      help="where the run's logs, request logs, registry and report go (default .stillhouse/demo, or "
                           ".stillhouse/demo-quick with --quick); emptied at the start of each run")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from loop import summary
    from loop.plan import FULL, QUICK
    from loop.recipe import StageError, run
    from monitoring.stack import StackError

    plan = QUICK if args.quick else FULL
    state_dir = args.state_dir or Path(".stillhouse") / ("demo-quick" if args.quick else "demo")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        result = run(plan, state_dir, say)
    except (StageError, StackError) as error:
        print(f"stillhouse demo: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stillhouse demo: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    path = summary.write_json(result)
    print(summary.format_text(result))
    print(f"\n(the same figures as JSON: {path})")
    return 0
