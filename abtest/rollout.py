"""`stillhouse abtest watch`: ramp a candidate through the plan's steps while the verdicts allow.

Each look analyses the traffic since the current step began (the weights are fixed within a
step, so the SRM check and the arms' numbers are sound) and ``decide`` picks one action:

- ``rollback``: the analysis says roll back (a failed SRM, a breached guardrail, a primary metric
  significantly worse): the candidate's weight goes to 0 at once and the watch ends;
- ``advance``: the step has been held ``min_minutes_per_step`` and every guardrail holds: the
  candidate's weight goes to the next step (the control takes the rest);
- ``promoted``: the verdict is ``promote`` where the next step is 100% (full traffic leaves no
  control to compare with, so reaching it is the promotion) or at the last step: the watch ends;
- ``hold``: anything else (too early, guardrails not yet shown to hold).

A new weight is written to the traffic-split file atomically (a temporary file, then rename), so
the router's hot reload sees either the old file or the new one. Every decision and its inputs
go to a JSONL decision log and to the ``stillhouse_rollout_*`` metrics.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from abtest import config as traffic
from abtest.analysis import PROMOTE, ROLLBACK, Analysis, analyze_route, pick_candidate
from monitoring import catalog
from monitoring.metrics import RolloutMetrics

ADVANCE, HOLD, ROLLED_BACK, PROMOTED = catalog.ROLLOUT_ACTIONS  # also the label values of the decisions metric


@dataclass(frozen=True)
class Decision:
    action: str
    weight: float  # the candidate's weight after the decision, percent
    reasons: list[str]
    window: tuple[float, float] | None = None  # the traffic the decision analysed (None: no analysis)

    @property
    def final(self) -> bool:
        return self.action in (ROLLED_BACK, PROMOTED)


def decide(analysis: Analysis, steps: list[float], weight: float, held_minutes: float, min_minutes: float) -> Decision:
    """The next action for a candidate now at ``weight`` percent, whose step has been held ``held_minutes``."""
    if analysis.verdict == ROLLBACK:
        return Decision(ROLLED_BACK, 0.0, analysis.reasons)
    if held_minutes < min_minutes:
        return Decision(HOLD, weight, [f"step {weight:g}% held {held_minutes:.1f} of {min_minutes:g} minutes"])
    unproven = [row.name for row in analysis.metrics if row.role == "guardrail" and row.status != "pass"]
    if unproven:
        return Decision(HOLD, weight, [f"guardrails {unproven} not yet shown to hold at {weight:g}%"])
    later = [step for step in steps if step > weight]
    if later and later[0] < 100:
        return Decision(ADVANCE, later[0], [f"step {weight:g}% held {held_minutes:.1f} minutes with every guardrail holding",
                                            *analysis.reasons])
    # Full traffic leaves no control to compare with: it is the promotion itself, on a promote verdict only.
    if analysis.verdict == PROMOTE:
        return Decision(PROMOTED, later[0] if later else weight, analysis.reasons)
    waiting = f"the next step ({later[0]:g}%) replaces the control" if later else f"at the last step ({weight:g}%)"
    return Decision(HOLD, weight, [f"{waiting}: waiting for a promote verdict", *analysis.reasons])


def write_weights(path: Path, route: str, weights: dict[str, float]) -> traffic.TrafficConfig:
    """Set some arms' weights in the traffic-split file, validated, replacing the file atomically.

    The file is rewritten from its parsed YAML, so comments are not kept.
    """
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    for arm, weight in weights.items():
        raw["routes"][route]["arms"][arm]["weight"] = weight
    config = traffic.parse(raw, str(path))  # refuses a file the router would refuse
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        yaml.safe_dump(raw, file, sort_keys=False)
    os.replace(temporary, path)
    return config


def split_for(config: traffic.TrafficConfig, route: str, candidate: str, weight: float) -> dict[str, float]:
    """Weights that give ``candidate`` ``weight`` percent and the control the rest."""
    return {candidate: weight, config.routes[route].control_arm(): 100.0 - weight}


class Watch:
    """One candidate's rollout: looks, decisions, file writes and the decision log."""

    def __init__(self, config_path: Path, route: str, source, candidate: str | None = None, decision_log: Path | None = None,
                 dry_run: bool = False, clock=time.time, metrics: RolloutMetrics | None = None):
        self.config_path = Path(config_path)
        self.route = route
        self.source = source
        self.dry_run = dry_run
        self.clock = clock
        self.metrics = metrics or RolloutMetrics()
        config = traffic.load(self.config_path)
        route_config = config.routes[route]
        if route_config.experiment is None:
            raise ValueError(f"route {route!r} has no `experiment:` block; the ramp's steps come from experiment.ramp")
        candidates = route_config.candidate_arms()
        # A fresh rollout's candidate has weight 0, so a lone candidate is the one meant.
        self.candidate = candidates[0] if candidate is None and len(candidates) == 1 else pick_candidate(route_config, candidate)
        self.plan = route_config.experiment
        self.decision_log = Path(decision_log) if decision_log else None
        self.step_started = self.clock()
        self.weight = self.share = self._current_weight(config)

    def _current_weight(self, config: traffic.TrafficConfig) -> float:
        arms = config.routes[self.route].arms
        total = sum(arm.weight for arm in arms.values()) or 1
        return 100.0 * arms[self.candidate].weight / total

    def start(self) -> Decision:
        """Put the candidate on the first step when it is below it (a fresh rollout)."""
        first = self.plan.ramp.steps[0]
        if self.weight >= first:
            decision = Decision(HOLD, self.weight, [f"the candidate already has {self.weight:g}%"])
        else:
            decision = Decision(ADVANCE, first, [f"rollout starts at the first step, {first:g}%"])
        self._apply(decision, None)  # logged like every other decision
        return decision

    def look(self) -> Decision:
        """Analyse the current step (from the moment the router serves it) and act on it."""
        now = self.clock()
        since, waiting = self._served_since(now)
        if since is None:
            decision = Decision(HOLD, self.weight, [waiting])
            self._apply(decision, None)
            return decision
        config = traffic.load(self.config_path)
        analysis, _ = analyze_route(config, self.route, self.source, since, now, self.candidate)
        decision = decide(analysis, self.plan.ramp.steps, self.weight, (now - since) / 60, self.plan.ramp.min_minutes_per_step)
        decision = replace(decision, window=(since, now))
        self._apply(decision, analysis)
        return decision

    def _served_since(self, now: float) -> tuple[float | None, str]:
        """When the router was first seen serving the current weight (the step's traffic starts there).

        The router reloads the file within its reload interval and is scraped some seconds later;
        counting from the file write would mix the old split's last requests into the new step's
        and fail the SRM check. A dry run writes nothing, so its steps start at once.
        """
        if self.dry_run:
            return self.step_started, ""
        result = self.source.read(catalog.ROUTER_ARM_WEIGHT, self.step_started, now, route=self.route, arm=self.candidate)
        if result.status in ("error", "unreachable"):
            return None, f"cannot read the router's weights: {result.error}"
        # Every router replica still exporting (its series reaches the latest point) must serve the new weight.
        latest = max((series.points[-1][0] for series in result.series if series.points), default=None)
        alive = [series for series in result.series if series.points and series.points[-1][0] == latest]
        firsts = [next((t for t, value in series.points if abs(value - self.share) < 1e-6), None) for series in alive]
        if not firsts or None in firsts:
            return None, f"waiting until the router serves {self.share:g}% to {self.candidate} (its reload and the next scrape)"
        return max(firsts), ""

    def _apply(self, decision: Decision, analysis: Analysis | None) -> None:
        before = self.weight
        if decision.weight != before and not self.dry_run:
            config = traffic.load(self.config_path)
            written = write_weights(self.config_path, self.route, split_for(config, self.route, self.candidate, decision.weight))
            self.share = self._current_weight(written)  # what the router's weight gauge will show
        if decision.weight != before:
            self.weight = decision.weight
            self.step_started = self.clock()
        if analysis is None:
            self.metrics.observe_decision(self.route, self.candidate, decision.action, decision.weight)
        else:
            primary = next(row for row in analysis.metrics if row.role == "primary")
            self.metrics.observe_decision(self.route, self.candidate, decision.action, decision.weight, analysis.verdict,
                                          analysis.srm.p_value, primary.always_valid_p_value)
        if self.decision_log is not None:
            entry = {"time": self.clock(), "route": self.route, "candidate": self.candidate, "action": decision.action,
                     "weight_before": before, "weight_after": decision.weight, "dry_run": self.dry_run, "reasons": decision.reasons,
                     "analysis": analysis.to_json() if analysis else None}
            self.decision_log.parent.mkdir(parents=True, exist_ok=True)
            with self.decision_log.open("a") as file:
                file.write(json.dumps(entry) + "\n")
