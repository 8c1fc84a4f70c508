"""What `stillhouse demo` prints at the end, and the same figures as ``summary.json``."""

from __future__ import annotations

import json
from pathlib import Path

from loop.recipe import ROUTE, STAGES, STUDENT, TEACHER, DemoResult
from monitoring.stack import LOOPBACK


def to_json(result: DemoResult) -> dict:
    """Every figure of the summary, for scripts and tests."""
    analysis = result.analysis
    primary = next((row for row in analysis.metrics if row.role == "primary"), None) if analysis else None
    adapter = result.adapter
    return {
        "base": result.plan.base,
        "seconds": result.seconds,
        "teacher_traffic": {
            "requests": len(result.teacher_traffic),
            "failed": sum(1 for sent in result.teacher_traffic if not sent.ok),
            "scored": sum(1 for sent in result.teacher_traffic if sent.scored),
            "clients": sorted({sent.client for sent in result.teacher_traffic}),
        },
        "rows_logged": result.logged_teacher_rows,
        "curation": [{"step": step["step"], "rows_in": step["rows_in"], "rows_out": step["rows_out"], "dropped": step["dropped"]}
                     for step in result.card.get("steps", [])],
        "rows_after_curation": {split: figures["rows"] for split, figures in result.card.get("splits", {}).items()},
        "adapter": {"id": adapter.id, "path": str(adapter.path), "profile": adapter.metadata.get("profile"),
                    "train_steps": adapter.metadata.get("metrics", {}).get("train_steps")} if adapter else None,
        "evaluation": {
            prompt: {"rows": report.rows, "failed_requests": report.failed_requests, "prompt_tokens_per_request": report.mean_prompt_tokens,
                     "metrics": {metric.name: {"value": metric.value, "ci95": [metric.low, metric.high]} for metric in report.metrics}}
            for prompt, report in result.evaluations.items()
        },
        "ab_traffic": {"requests": len(result.ab_traffic), "failed": sum(1 for sent in result.ab_traffic if not sent.ok),
                       "scored": sum(1 for sent in result.ab_traffic if sent.scored)},
        "arms": result.arms,
        "decisions": [{"action": d.action, "weight": d.weight, "reasons": d.reasons} for d in result.decisions],
        "srm": {"status": analysis.srm.status, "p_value": analysis.srm.p_value, "observed": analysis.srm.observed} if analysis else None,
        "primary": {"metric": primary.name, "status": primary.status, "control": primary.control, "candidate": primary.candidate,
                    "estimate": primary.estimate, "ci": primary.ci, "always_valid_p_value": primary.always_valid_p_value}
        if primary else None,
        "verdict": {"verdict": analysis.verdict, "reasons": analysis.reasons} if analysis else None,
        "metrics_source": result.source,
        "report": str(result.report) if result.report else None,
        "dashboards": [str(path) for path in result.dashboards],
    }


def write_json(result: DemoResult) -> Path:
    path = result.state_dir / "summary.json"
    path.write_text(json.dumps(to_json(result), indent=2, default=str) + "\n")
    return path


def format_text(result: DemoResult) -> str:
    """The summary a person reads: each stage's figures, the verdict, and where to look next."""
    data = to_json(result)
    lines = [f"Stillhouse demo on {data['base']}: the whole loop in {sum(result.seconds.values()):.0f} s", ""]
    lines += [f"  {name:<16} {result.seconds[name]:7.1f} s" for name in STAGES if name in result.seconds]
    traffic = data["teacher_traffic"]
    lines += ["", f"1. teacher traffic: {traffic['requests']} requests ({', '.join(traffic['clients'])} clients), "
                  f"{traffic['scored']} scored through POST /feedback, {traffic['failed']} failed; "
                  f"{data['rows_logged']} rows read back from the router's request log"]
    steps = "; ".join(f"{step['step']} {step['rows_in']}→{step['rows_out']}" for step in data["curation"])
    splits = ", ".join(f"{split} {rows}" for split, rows in data["rows_after_curation"].items())
    lines.append(f"2. curation: {steps} (rows after curation: {splits})")
    if data["adapter"]:
        adapter = data["adapter"]
        lines.append(f"3. student: {adapter['id']} registered (servable under the {adapter['profile']} profile), "
                     f"{adapter['train_steps']} training steps")
    lines += ["", f"   held-out gold rows ({next(iter(data['evaluation'].values()))['rows'] if data['evaluation'] else 0}):"]
    for prompt, figures in data["evaluation"].items():
        scores = "  ".join(f"{name} {m['value']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" for name, m in figures["metrics"].items())
        lines.append(f"   {prompt:<8} {scores}  prompt tokens/request {figures['prompt_tokens_per_request']:.1f}")
    lines += ["", "4. A/B test (router request log, the whole ramp):",
              f"   {'arm':<8} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'prompt tok':>10} {'feedback':>8} {'correct':>7}"]
    for arm, figures in data["arms"].items():
        lines.append(f"   {arm:<8} {figures['requests']:>8} {figures['errors']:>6} {_number(figures['latency_p50_ms'], 0):>8} "
                     f"{_number(figures['latency_p95_ms'], 0):>8} {_number(figures['prompt_tokens_per_request'], 1):>10} "
                     f"{figures['feedback']:>8} {_number(figures['correct_rate'], 3):>7}")
    for decision, repeats in _runs(data["decisions"]):
        times = f" ×{repeats}" if repeats > 1 else ""
        lines.append(f"   watch: {decision['action']}{times} → student at {decision['weight']:g}% — {'; '.join(decision['reasons'])}")
    if data["verdict"]:
        srm, primary = data["srm"], data["primary"]
        lines += ["", f"5. the watch's last analysis, of the step it last looked at (metrics from {data['metrics_source']}):",
                  f"   SRM check: {srm['status']} (p = {_number(srm['p_value'], 4)}, observed {srm['observed']})",
                  f"   primary `{primary['metric']}`: {TEACHER} {_number(primary['control'], 3)}, {STUDENT} {_number(primary['candidate'], 3)}, "
                  f"difference {_number(primary['estimate'], 3)} CI {_interval(primary['ci'])}, always-valid p = {_number(primary['always_valid_p_value'], 4)}",
                  f"   verdict: {data['verdict']['verdict'].upper()} — {'; '.join(data['verdict']['reasons'])}"]
    state = result.state_dir
    lines += ["", "files:",
              f"   report      {data['report']}",
              f"   dashboards  {', '.join(data['dashboards'])} (Grafana: Dashboards → Import)",
              f"   decisions   {state / 'decisions.jsonl'}",
              f"   logs        {state / 'logs'}; request logs {state / 'router-requests.db'}, {state / 'server-requests.db'}",
              "", "next:",
              f"   open {data['report']} in a browser",
              f"   stillhouse up --base {data['base']} --traffic {state / 'traffic.yaml'} --registry {state / 'registry'} "
              f"--server-port {_server_port(state)}   # keep the stack running",
              f"   stillhouse abtest analyze --route {ROUTE} --config {state / 'traffic.yaml'} --prometheus http://{LOOPBACK}:9090 --html report.html"]
    return "\n".join(lines)


def _runs(decisions: list[dict]) -> list[tuple[dict, int]]:
    """Consecutive decisions with the same action and weight as one (the last of them) and their count."""
    runs: list[tuple[dict, int]] = []
    for decision in decisions:
        if runs and (runs[-1][0]["action"], runs[-1][0]["weight"]) == (decision["action"], decision["weight"]):
            runs[-1] = (decision, runs[-1][1] + 1)
        else:
            runs.append((decision, 1))
    return runs


def _server_port(state: Path) -> str:
    import yaml

    upstream = yaml.safe_load((state / "traffic.yaml").read_text())["routes"][ROUTE]["arms"][TEACHER]["upstream"]
    return upstream.rsplit(":", 1)[1]


def _number(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _interval(ci) -> str:
    return "—" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
