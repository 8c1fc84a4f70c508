"""The demo's stages, top to bottom: stack → teacher traffic → distil → A/B test → verdict.

Every process the demo starts is a child of the stack (server, router, Prometheus), so one
``Stack.stop`` in a ``finally`` ends them all, on success, on a failed stage and on Ctrl-C or
SIGTERM. A failed stage raises ``StageError`` naming the stage, the reason and the logs.
"""

from __future__ import annotations

import contextlib
import importlib
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from abtest import config as traffic
from abtest.analysis import Analysis, analyze_route
from abtest.report import write_html
from abtest.rollout import Decision, Watch
from loop.plan import DemoPlan
from loop.users import FEEDBACK_METRIC, Sent, SimulatedUsers
from monitoring import dashboards
from monitoring.prometheus import Prometheus, PrometheusSource
from monitoring.snapshots import ScrapingSource
from monitoring.stack import LOOPBACK, Stack, StackSettings
from serving.loopback import free_port
from serving.registry import AdapterEntry
from serving.request_log import LoggedExchange, open_store
from training import recipe
from training.config import DataConfig, EndpointConfig, LogFilter, RunConfig
from training.endpoint import Endpoint
from training.evaluation import EvalReport, evaluate
from training.row import Row
from training.task import Task, load_task

ROUTE = "sentiment"
TEACHER, STUDENT = "teacher", "student"
STAGES = ("stack", "teacher traffic", "distil", "A/B test", "verdict")

Say = Callable[[str], None]


class StageError(RuntimeError):
    """A stage failed: the message names it, says why and where its logs are."""


@dataclass
class DemoResult:
    """What each stage measured; ``loop.summary`` prints it."""

    plan: DemoPlan
    state_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    teacher_traffic: list[Sent] = field(default_factory=list)
    logged_teacher_rows: int = 0
    card: dict = field(default_factory=dict)
    adapter: AdapterEntry | None = None
    evaluations: dict[str, EvalReport] = field(default_factory=dict)
    ab_traffic: list[Sent] = field(default_factory=list)
    arms: dict[str, dict] = field(default_factory=dict)  # from the router's request log, the A/B window
    decisions: list[Decision] = field(default_factory=list)
    analysed: tuple[tuple[float, float], traffic.TrafficConfig] | None = None  # the last look's window and split
    analysis: Analysis | None = None
    report: Path | None = None
    dashboards: list[Path] = field(default_factory=list)
    source: str = ""


def run(plan: DemoPlan, state_dir: Path, say: Say) -> DemoResult:
    """The whole loop; the stack is stopped however it ends."""
    state_dir = Path(state_dir)
    _fresh(state_dir)
    result = DemoResult(plan, state_dir)
    task = load_task("demo")
    server_port, router_port, prometheus_port = free_port(), free_port(), free_port()
    server_url = f"http://{LOOPBACK}:{server_port}"
    traffic_path = state_dir / "traffic.yaml"
    write_traffic(traffic_path, server_url, plan, student=None)
    stack = Stack(StackSettings(
        traffic=traffic_path, base=plan.base, state_dir=state_dir, server_port=server_port, router_port=router_port,
        prometheus_port=prometheus_port, registry=state_dir / "registry", scrape_interval_s=plan.scrape_interval_s,
        reload_interval_s=0.5,
    ))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _stage("stack", result, say, stack):
            stack.start()
        router_url = f"http://{LOOPBACK}:{router_port}"
        source = _metrics_source(stack, router_url, state_dir)
        result.source = "Prometheus" if isinstance(source, PrometheusSource) else "the router's /metrics"
        users = SimulatedUsers(router_url, task, ROUTE, plan.users)
        try:
            with _stage("teacher traffic", result, say, stack):
                result.teacher_traffic = users.send(plan.teacher_requests, plan.concurrency, "teacher traffic")
                say(_traffic_line(result.teacher_traffic))
            with _stage("distil", result, say, stack):
                _distil(result, task, state_dir, server_url, say)
            with _stage("A/B test", result, say, stack):
                _ab_test(result, users, source, traffic_path, server_url, say)
        finally:
            users.close()
        with _stage("verdict", result, say, stack):
            _verdict(result, source, say)
    finally:
        stack.stop()
        signal.signal(signal.SIGTERM, previous)
    return result


# --- stages ---------------------------------------------------------------------------------------

def _distil(result: DemoResult, task: Task, state_dir: Path, server_url: str, say: Say) -> None:
    """Dataset from the router's log of the teacher arm → curation → a zero-shot LoRA student, registered and scored."""
    config = RunConfig(
        name=f"{ROUTE}-student", task="demo", base=result.plan.base, runs_dir=str(state_dir / "runs"),
        registry=str(state_dir / "registry"),
        data=DataConfig(source=f"request-log:{state_dir / 'router-requests.db'}", log_filter=LogFilter(route=ROUTE, arm=TEACHER),
                        use_gold_as_output=False),
        train={"max_steps": result.plan.train_steps, "batch_size": 8, "lr": 5e-4, "save_every": result.plan.train_steps},
    )
    result.logged_teacher_rows = len(recipe.build(config, task, say))
    result.card = recipe.curate(config, task, say)
    _, result.adapter = recipe.train(config, say)
    gold = gold_rows(task, result.plan.gold_rows)
    for prompt, model in ((TEACHER, None), (STUDENT, result.adapter.id)):
        endpoint = Endpoint(EndpointConfig(url=server_url, model=model, concurrency=result.plan.concurrency))
        result.evaluations[prompt] = evaluate(task, gold, endpoint, prompt)
        say(f"{prompt} on {len(gold)} held-out gold rows: " + ", ".join(
            f"{metric.name} {metric.value:.3f} [{metric.low:.3f}, {metric.high:.3f}]" for metric in result.evaluations[prompt].metrics))


def _ab_test(result: DemoResult, users: SimulatedUsers, source, traffic_path: Path, server_url: str, say: Say) -> None:
    """The student joins the route at 0%; the watch ramps it while users keep sending traffic and feedback."""
    plan = result.plan
    write_traffic(traffic_path, server_url, plan, student=result.adapter.id)
    watch = Watch(traffic_path, ROUTE, source, candidate=STUDENT, decision_log=result.state_dir / "decisions.jsonl")
    started = time.time()
    stop = threading.Event()
    sent: list[Sent] = []
    sender = threading.Thread(target=lambda: sent.extend(users.send(plan.ab_requests, plan.concurrency, "A/B traffic",
                                                                    until=started + plan.ab_seconds, stop=stop)))
    decision = watch.start()
    result.decisions.append(decision)
    say(_decision_line(decision))
    sender.start()
    try:
        while sender.is_alive() and not decision.final:
            sender.join(plan.look_interval_s)
            source.look()
            served = traffic.load(traffic_path)  # the split this look analyses (the decision may change it)
            decision = watch.look()
            result.decisions.append(decision)
            if decision.window is not None:
                result.analysed = (decision.window, served)
            say(_decision_line(decision))
    finally:
        stop.set()
        sender.join()
    result.ab_traffic = sent
    result.arms = arm_figures(result.state_dir / "router-requests.db", started)
    say(_traffic_line(sent))


def _verdict(result: DemoResult, source, say: Say) -> None:
    """The watch's last analysed step again (with its history), its HTML report, and the dashboards."""
    source.look()
    if result.analysed is None:
        raise RuntimeError("the watch never analysed a step: no traffic reached both arms within the A/B stage")
    (start, end), config = result.analysed
    result.analysis, history = analyze_route(config, ROUTE, source, start, end, STUDENT, points=20)
    result.report = write_html(result.state_dir / "report.html", result.analysis, history, config.routes[ROUTE].weights())
    result.dashboards = dashboards.build(result.state_dir / "dashboards")
    say(f"verdict: {result.analysis.verdict} — {'; '.join(result.analysis.reasons)}")


# --- pieces -----------------------------------------------------------------------------------------

def write_traffic(path: Path, server_url: str, plan: DemoPlan, student: str | None) -> traffic.TrafficConfig:
    """The route's traffic-split file: the teacher alone, or with the student as a candidate at 0%.

    Written atomically and validated as the router will read it.
    """
    arms = {TEACHER: {"role": "control", "upstream": server_url, "adapter": None, "prompt": {"task": "sentiment", "role": "teacher"},
                      "weight": 100, "fallback": True}}
    if student is not None:
        arms[STUDENT] = {"role": "candidate", "upstream": server_url, "adapter": student,
                         "prompt": {"task": "sentiment", "role": "student"}, "weight": 0}
    guardrails = {"error_rate": {"max_absolute": 0.02}, "latency_p95": {"max_relative_increase": 0.25}} if plan.base != "tiny" else {}
    body = {
        "version": 1, "salt": "stillhouse-demo", "sticky": {"header": "X-User-Id"},
        "routes": {ROUTE: {
            "mode": "template", "input": "text",
            "metrics": {FEEDBACK_METRIC: {"type": "boolean", "goal": "maximize"}},
            "checks": {"valid_output": {"labels": ["positive", "negative", "neutral"]}},
            "arms": arms,
            "experiment": {"primary": FEEDBACK_METRIC, "secondary": ["valid_output"], "guardrails": guardrails,
                           "min_samples_per_arm": plan.min_samples_per_arm, "method": "sequential",
                           "ramp": {"steps": list(plan.ramp_steps), "min_minutes_per_step": plan.min_minutes_per_step}},
        }},
    }
    config = traffic.parse(body, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(yaml.safe_dump(body, sort_keys=False))
    temporary.replace(path)
    return config


def gold_rows(task: Task, n: int) -> list[Row]:
    """Held-out gold rows from the task's generator (a vocabulary the live traffic never uses)."""
    generator = importlib.import_module(task.generator)
    return [Row(id=record["id"], inputs={field: record[field] for field in task.input_fields}, gold=record["label"], split="test")
            for record in generator.generate("heldout", n)]


def arm_figures(log_path: Path, since: float) -> dict[str, dict]:
    """Per arm, from the router's request log since ``since``: requests, latency p50/p95, prompt tokens, feedback."""
    store = open_store(log_path)
    try:
        logged = store.query(route=ROUTE, since=since)
    finally:
        store.close()
    by_arm: dict[str, list[LoggedExchange]] = {}
    for item in logged:
        by_arm.setdefault(item.exchange.arm, []).append(item)
    figures = {}
    for arm, items in sorted(by_arm.items()):
        latencies = sorted(item.exchange.latency_ms for item in items if item.exchange.latency_ms is not None)
        prompts = [item.exchange.prompt_tokens for item in items if item.exchange.prompt_tokens is not None]
        scores = [item.feedback[FEEDBACK_METRIC] for item in items if FEEDBACK_METRIC in item.feedback]
        figures[arm] = {
            "requests": len(items),
            "errors": sum(1 for item in items if item.exchange.status != 200),
            "latency_p50_ms": _quantile(latencies, 0.5),
            "latency_p95_ms": _quantile(latencies, 0.95),
            "prompt_tokens_per_request": statistics.fmean(prompts) if prompts else None,
            "feedback": len(scores),
            "correct_rate": statistics.fmean(scores) if scores else None,
        }
    return figures


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _metrics_source(stack: Stack, router_url: str, state_dir: Path):
    """Prometheus when the stack runs one, else snapshots of the router's /metrics."""
    if any(child.name == "prometheus" for child in stack.children):
        return PrometheusSource(Prometheus(f"http://{LOOPBACK}:{stack.settings.prometheus_port}"))
    return ScrapingSource(f"{router_url}/metrics", state_dir / "snapshots.jsonl")


def _fresh(state_dir: Path) -> None:
    """Each run is its own experiment: the previous run's logs, registry and Prometheus data go."""
    if state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True)


@contextlib.contextmanager
def _stage(name: str, result: DemoResult, say: Say, stack: Stack) -> Iterator[None]:
    number = STAGES.index(name) + 1
    say(f"[{number}/{len(STAGES)}] {name} ...")
    started = time.perf_counter()
    try:
        yield
    except KeyboardInterrupt:
        raise
    except Exception as error:
        logs = ", ".join(str(child.log) for child in stack.children)
        raise StageError(f"stage {number} ({name}) failed: {type(error).__name__}: {error}\n  logs: {logs}") from error
    result.seconds[name] = time.perf_counter() - started
    say(f"[{number}/{len(STAGES)}] {name} done in {result.seconds[name]:.1f} s")


def _traffic_line(sent: list[Sent]) -> str:
    failed = [item for item in sent if not item.ok]
    arms: dict[str, int] = {}
    for item in sent:
        if item.arm:
            arms[item.arm] = arms.get(item.arm, 0) + 1
    line = f"{len(sent)} requests, {sum(item.scored for item in sent)} scored through POST /feedback, {len(failed)} failed"
    if failed:
        line += f" (first: {failed[0].error})"
    return line + (f"; answered by {arms} (openai users)" if arms else "")


def _decision_line(decision: Decision) -> str:
    return f"watch: {decision.action} → student at {decision.weight:g}% — {'; '.join(decision.reasons)}"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the demo the way Ctrl-C does
