"""The A/B analysis of one route: does the candidate arm beat the control, and what to do about it.

Setup → read → test → decide:

1. ``read_window`` reads the route's raw router series over a window from a source (Prometheus,
   or snapshots of the router's ``/metrics``; both answer ``read(spec, start, end, ...)``).
2. ``summarise`` turns them into per-arm sufficient statistics (``ArmWindow``) at any cut time,
   with exact counter differences (``monitoring.series``).
3. ``analyze`` runs the pre-registered plan (``abtest.experiment.Experiment``): the SRM check,
   the primary metric (fixed-horizon p-value and always-valid mSPRT p-value with its confidence
   sequence), secondary metrics with Holm / BH corrections, guardrails as non-inferiority
   margins, the samples still needed, and a verdict with its reasons in plain words.

The unit of analysis is the request by default: with sticky per-user assignment a user's
requests are correlated, which makes request-level intervals too narrow; the result says so, and
``bucket_s`` tests batch means over time buckets instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace

from scipy import stats

from abtest.experiment import Experiment, Guardrail
from abtest.stats import fixed, multiple, power, sequential
from abtest.stats.result import OK, Comparison
from abtest.stats.srm import SrmCheck, srm
from abtest.stats.sufficient import Mean, Proportion, batch_means
from monitoring import catalog
from monitoring.series import Series, quantile_from_buckets, window_increase

PROMOTE, ROLLBACK, CONTINUE, INCONCLUSIVE = catalog.VERDICTS  # also the label values of the verdict metric
ERROR_OUTCOMES = ("upstream_error", "client_error")
_PARTS = ("n", "pos", "neg", "sq")  # the order of SufficientStats.specs
# A series whose first point is this close to the window's start existed there: both sources put a
# present series' first point at the start, and the Prometheus API rounds times to milliseconds.
_START_TOLERANCE_S = 0.01
#: what the router reads for an analysis, by the ``by`` labels the numbers are grouped on
_READS = {
    "requests": (catalog.ROUTER_REQUESTS, None, ("arm", "outcome")),
    "fallbacks": (catalog.ROUTER_FALLBACKS, None, ("arm",)),
    **{f"feedback_{part}": (spec, None, ("arm", "metric")) for part, spec in zip(_PARTS, catalog.ROUTER_FEEDBACK.specs)},
    **{f"check_{part}": (spec, None, ("arm", "check")) for part, spec in zip(_PARTS, catalog.ROUTER_OUTPUT_CHECKS.specs)},
    "latency": (catalog.ROUTER_REQUEST_DURATION, "bucket", ("arm", "le")),
    "ttft": (catalog.ROUTER_TIME_TO_FIRST_TOKEN, "bucket", ("arm", "le")),
    "prompt_tokens": (catalog.ROUTER_PROMPT_TOKENS, None, ("arm",)),
    "generated_tokens": (catalog.ROUTER_GENERATED_TOKENS, None, ("arm",)),
}


@dataclass(frozen=True)
class Window:
    """Raw series of one route between ``start`` and ``end``, as read from a source."""

    route: str
    start: float
    end: float
    series: dict[str, list[Series]]
    errors: list[str] = field(default_factory=list)  # sources that failed: reported, never raised


def read_window(source, route: str, start: float, end: float) -> Window:
    """Every series the analysis needs, for one route, from ``source.read``."""
    series, errors = {}, []
    for key, (spec, part, _) in _READS.items():
        result = source.read(spec, start, end, part, route=route)
        if result.status in ("error", "unreachable"):
            errors.append(f"{spec.name}: {result.error}")
        series[key] = result.series
    return Window(route, start, end, series, errors)


@dataclass(frozen=True)
class ArmWindow:
    """One arm's sufficient statistics over a window."""

    requests: dict[str, int]  # outcome -> count, the arm as the one that answered
    fallbacks_from: int  # requests assigned here that the fallback arm answered
    metrics: dict[str, Mean]  # feedback metric or output check -> n, sum, sum of squares
    latency_buckets: dict[float, float]
    ttft_buckets: dict[float, float]
    prompt_tokens: float
    generated_tokens: float

    @property
    def assigned(self) -> int:
        """Requests the split sent to this arm (a fallback counts where it was assigned)."""
        return sum(self.requests.values()) - self.requests.get("fallback", 0) + self.fallbacks_from

    @property
    def answered(self) -> int:
        return sum(self.requests.get(outcome, 0) for outcome in catalog.ANSWERED_ROUTER_OUTCOMES)

    @property
    def errors(self) -> int:
        return sum(self.requests.get(outcome, 0) for outcome in ERROR_OUTCOMES)


def summarise(window: Window, arms: list[str], until: float | None = None) -> dict[str, ArmWindow]:
    """Per-arm statistics from the window's start to ``until`` (its end by default)."""
    until = window.end if until is None else until

    def grouped(key: str) -> dict[tuple[str, ...], float]:
        cut = [Series(s.name, s.labels, tuple(p for p in s.points if p[0] <= until)) for s in window.series.get(key, [])]
        return window_increase(cut, window.start, _READS[key][2], _START_TOLERANCE_S)

    requests, fallbacks = grouped("requests"), grouped("fallbacks")
    outcome_stats = [{part: grouped(f"{kind}_{part}") for part in _PARTS} for kind in ("feedback", "check")]
    latency, ttft = grouped("latency"), grouped("ttft")
    prompt, generated = grouped("prompt_tokens"), grouped("generated_tokens")
    result = {}
    for arm in arms:
        metrics = {
            name: Mean(round(n), stats["pos"].get((arm, name), 0.0) - stats["neg"].get((arm, name), 0.0), stats["sq"].get((arm, name), 0.0))
            for stats in outcome_stats for (a, name), n in stats["n"].items() if a == arm
        }
        result[arm] = ArmWindow(
            requests={outcome: round(v) for (a, outcome), v in requests.items() if a == arm},
            fallbacks_from=round(fallbacks.get((arm,), 0)),
            metrics=metrics,
            latency_buckets={float(le): v for (a, le), v in latency.items() if a == arm},
            ttft_buckets={float(le): v for (a, le), v in ttft.items() if a == arm},
            prompt_tokens=prompt.get((arm,), 0.0),
            generated_tokens=generated.get((arm,), 0.0),
        )
    return result


@dataclass(frozen=True)
class MetricResult:
    """One row of the analysis: a tested metric (primary or secondary) or a guardrail."""

    name: str
    role: str  # primary, secondary, guardrail
    status: str  # tests: a stats status code; guardrails: pass, breach, not_enough_data
    control: float | None = None
    candidate: float | None = None
    estimate: float | None = None  # candidate - control
    ci: tuple[float, float] | None = None
    p_value: float | None = None  # fixed-horizon (secondary: corrected)
    always_valid_p_value: float | None = None  # mSPRT (secondary: corrected)
    relative_lift: float | None = None
    limit: float | None = None  # guardrails: the highest passing candidate value
    control_ci: tuple[float, float] | None = None  # each arm's own 95% interval (tests only)
    candidate_ci: tuple[float, float] | None = None
    detail: str = ""


@dataclass(frozen=True)
class Analysis:
    """The verdict on one candidate against the control, with every number behind it (``to_json`` for --json)."""

    route: str
    control: str
    candidate: str
    window: tuple[float, float]
    arms: dict[str, int]  # requests assigned per arm
    srm: SrmCheck
    metrics: list[MetricResult]
    planned_samples_per_arm: int | None
    samples_needed: int | None
    verdict: str
    reasons: list[str]
    unit: str = "request"
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        body = asdict(self)
        body["window"] = {"start": self.window[0], "end": self.window[1], "seconds": self.window[1] - self.window[0]}
        return _finite(body)


def _finite(value):
    """JSON has no NaN or Infinity: such numbers become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@dataclass(frozen=True)
class MetricDeclaration:
    """What the route says about an outcome metric: boolean or float, and which way is better."""

    type: str  # boolean | float
    goal: str = "maximize"


def compare(declaration: MetricDeclaration, control: Mean, candidate: Mean, plan: Experiment) -> tuple[Comparison, Comparison]:
    """The fixed-horizon test and the always-valid one for one metric."""
    if declaration.type == "boolean":
        a, b = Proportion(control.n, round(control.sum)), Proportion(candidate.n, round(candidate.sum))
        return fixed.two_proportions(a, b, plan.alpha), sequential.msprt(a, b, plan.mde, plan.alpha).comparison
    return fixed.welch(control, candidate, plan.alpha), sequential.msprt(control, candidate, plan.mde, plan.alpha).comparison


def arm_interval(declaration: MetricDeclaration, arm: Mean, alpha: float) -> tuple[float, float] | None:
    """One arm's own interval: Wilson for a rate, Student-t for a mean."""
    if declaration.type == "boolean":
        return fixed.wilson(Proportion(arm.n, round(arm.sum)), alpha) if arm.n else None
    if arm.n < 2:
        return None
    half = float(stats.t.ppf(1 - alpha / 2, arm.n - 1)) * math.sqrt(arm.variance / arm.n)
    return arm.mean - half, arm.mean + half


def _metric_row(name: str, role: str, declaration: MetricDeclaration, control: Mean, candidate: Mean, plan: Experiment) -> MetricResult:
    fixed_result, sequential_result = compare(declaration, control, candidate, plan)
    shown = sequential_result if plan.method == "sequential" else fixed_result
    return MetricResult(
        name, role, fixed_result.status, fixed_result.control, fixed_result.candidate, fixed_result.estimate, shown.ci,
        fixed_result.p_value, sequential_result.p_value if sequential_result.ok else None, fixed_result.relative_lift,
        control_ci=arm_interval(declaration, control, plan.alpha), candidate_ci=arm_interval(declaration, candidate, plan.alpha),
        detail=f"n = {control.n} control, {candidate.n} candidate; goal: {declaration.goal}",
    )


def _rate_guardrail(name: str, margin: Guardrail, control: Proportion, candidate: Proportion, plan: Experiment) -> MetricResult:
    """Non-inferiority of a rate: breach when the whole interval of the increase lies above the margin."""
    test = fixed.two_proportions(control, candidate, plan.alpha)
    if plan.method == "sequential":
        interval = sequential.msprt(control, candidate, plan.mde, plan.alpha).comparison
        test = Comparison(test.method, test.status, test.control, test.candidate, test.estimate, interval.ci, test.p_value)
    rates = control.mean if control.n else None, candidate.mean if candidate.n else None
    if not test.ok:
        # No variance yet (e.g. no errors in either arm): nothing is known to be worse.
        status = "pass" if test.status == "zero_variance" and min(control.n, candidate.n) >= plan.min_samples_per_arm else "not_enough_data"
        what = "the same rate in every request" if test.status == "zero_variance" else test.status
        return MetricResult(name, "guardrail", status, *rates, detail=f"{what} ({control.n} and {candidate.n} requests)")
    allowed = margin.limit(test.control) - test.control
    status = "breach" if test.ci[0] > allowed else "pass" if test.ci[1] <= allowed else "not_enough_data"
    return MetricResult(name, "guardrail", status, test.control, test.candidate, test.estimate, test.ci, test.p_value,
                        limit=test.control + allowed, detail=f"increase {test.estimate:+.4f}, allowed +{allowed:.4f}")


def _threshold_guardrail(name: str, margin: Guardrail, control: float | None, candidate: float | None, counts: tuple[int, int],
                         plan: Experiment) -> MetricResult:
    """A quantile or a per-request mean has no variance in Prometheus: compare the values with the margin."""
    if control is None or candidate is None or min(counts) < plan.min_samples_per_arm:
        return MetricResult(name, "guardrail", "not_enough_data", control, candidate,
                            detail=f"{counts[0]} and {counts[1]} answered requests, {plan.min_samples_per_arm} needed per arm")
    limit = margin.limit(control)
    status = "breach" if candidate > limit else "pass"
    return MetricResult(name, "guardrail", status, control, candidate, candidate - control, limit=limit,
                        detail=f"{candidate:.4g} against a limit of {limit:.4g}")


def _guardrail(name: str, margin: Guardrail, a: ArmWindow, b: ArmWindow, plan: Experiment) -> MetricResult:
    if name == "error_rate":
        return _rate_guardrail(name, margin, Proportion(a.assigned, min(a.errors, a.assigned)),
                               Proportion(b.assigned, min(b.errors, b.assigned)), plan)
    if name == "fallback_rate":
        return _rate_guardrail(name, margin, Proportion(a.assigned, a.fallbacks_from), Proportion(b.assigned, b.fallbacks_from), plan)
    counts = (a.answered, b.answered)
    if name in ("latency_p95", "ttft_p95"):
        key = "latency_buckets" if name == "latency_p95" else "ttft_buckets"
        values = quantile_from_buckets(getattr(a, key), 0.95), quantile_from_buckets(getattr(b, key), 0.95)
        return _threshold_guardrail(name, margin, *values, counts, plan)
    per_request = [getattr(arm, name) / arm.answered if arm.answered else None for arm in (a, b)]
    return _threshold_guardrail(name, margin, *per_request, counts, plan)


def _better(declaration: MetricDeclaration, estimate: float) -> bool:
    return estimate > 0 if declaration.goal == "maximize" else estimate < 0


def analyze(
    route: str,
    plan: Experiment,
    declarations: Mapping[str, MetricDeclaration],
    weights: Mapping[str, float],
    control: str,
    candidate: str,
    arms: Mapping[str, ArmWindow],
    window: tuple[float, float],
    errors: list[str] | None = None,
    unit: str = "request",
) -> Analysis:
    """The verdict on ``candidate`` against ``control`` from per-arm statistics, following ``plan``.

    ``unit`` names what one observation of an outcome metric is (``arms``' metrics were built for it).
    """
    a, b = arms[control], arms[candidate]
    assigned = {name: arm.assigned for name, arm in arms.items()}
    ratio = srm({name: assigned.get(name, 0) for name in weights}, weights)
    empty = Mean(0, 0.0, 0.0)
    rows = [_metric_row(plan.primary, "primary", declarations[plan.primary], a.metrics.get(plan.primary, empty),
                        b.metrics.get(plan.primary, empty), plan)]
    secondary = [_metric_row(name, "secondary", declarations[name], a.metrics.get(name, empty), b.metrics.get(name, empty), plan)
                 for name in plan.secondary]
    fixed_adjusted = multiple.adjust([row.p_value for row in secondary], plan.correction)
    valid_adjusted = multiple.adjust([row.always_valid_p_value for row in secondary], plan.correction)
    rows += [MetricResult(**{**asdict(row), "p_value": p, "always_valid_p_value": q,
                             "detail": f"{row.detail}; p-values {plan.correction}-corrected over {len(secondary)}"})
             for row, p, q in zip(secondary, fixed_adjusted, valid_adjusted)]
    guardrails = [_guardrail(name, margin, a, b, plan) for name, margin in plan.guardrails.items()]
    rows += guardrails

    primary, declaration = rows[0], declarations[plan.primary]
    pooled = a.metrics.get(plan.primary, empty) + b.metrics.get(plan.primary, empty)
    variance = pooled.variance if declaration.type == "float" else Proportion(pooled.n, round(pooled.sum)).variance
    planned = power.sample_size_per_arm(variance, plan.mde, plan.alpha, plan.power) if variance and math.isfinite(variance) else None
    n = min(a.metrics.get(plan.primary, empty).n, b.metrics.get(plan.primary, empty).n)
    needed = max(planned - n, 0) if planned is not None else None
    verdict, reasons = _decide(plan, declaration, ratio, primary, guardrails, n, planned)
    return Analysis(route, control, candidate, window, assigned, ratio, rows, planned, needed, verdict, reasons, unit, errors or [])


def _decide(plan: Experiment, declaration: MetricDeclaration, ratio: SrmCheck, primary: MetricResult,
            guardrails: list[MetricResult], n: int, planned: int | None) -> tuple[str, list[str]]:
    """The verdict and its reasons, in the order a reviewer would check them."""
    if ratio.ok is False:
        return ROLLBACK, [f"sample ratio mismatch: the arms got {ratio.observed} requests where the weights expect "
                          f"{ {k: round(v) for k, v in ratio.expected.items()} } (chi-square p = {ratio.p_value:.2g} < 0.001); "
                          "the split is broken, so no comparison can be trusted"]
    breached = [g for g in guardrails if g.status == "breach"]
    if breached:
        return ROLLBACK, [f"guardrail {g.name} breached: {g.detail}" for g in breached]
    if n < plan.min_samples_per_arm:
        return CONTINUE, [f"{n} observations of {plan.primary} in the smaller arm; the plan waits for {plan.min_samples_per_arm} per arm"]
    if primary.status != OK:
        return CONTINUE, [f"{plan.primary} cannot be tested yet ({primary.status})"]
    p = primary.always_valid_p_value if plan.method == "sequential" else primary.p_value
    label = "always-valid p" if plan.method == "sequential" else "p"
    if plan.method == "fixed" and planned is not None and n < planned:
        return CONTINUE, [f"fixed-horizon test: {n} of the planned {planned} observations per arm; read it only then"]
    if p is not None and p < plan.alpha:
        if not _better(declaration, primary.estimate):
            return ROLLBACK, [f"{plan.primary} is worse on the candidate: {primary.estimate:+.4f} ({label} = {p:.3g} < {plan.alpha})"]
        unproven = [g.name for g in guardrails if g.status != "pass"]
        if unproven:
            return CONTINUE, [f"{plan.primary} is better ({primary.estimate:+.4f}, {label} = {p:.3g}), but guardrails "
                              f"{unproven} are not yet shown to hold"]
        return PROMOTE, [f"{plan.primary} is better on the candidate: {primary.estimate:+.4f} ({label} = {p:.3g} < {plan.alpha})",
                         *(f"guardrail {g.name} holds: {g.detail}" for g in guardrails)]
    within_mde = primary.ci is not None and -plan.mde < primary.ci[0] and primary.ci[1] < plan.mde
    if planned is not None and n >= planned and (plan.method == "fixed" or within_mde):
        return INCONCLUSIVE, [f"no difference in {plan.primary} at the planned {planned} observations per arm "
                              f"({label} = {p:.3g}); any effect is smaller than the plan's mde of {plan.mde}"]
    return CONTINUE, [f"no significant difference in {plan.primary} yet ({label} = {p:.3g}); "
                      f"{'about ' + str(max(planned - n, 0)) + ' more per arm to the planned size' if planned else 'keep collecting'}"]


def declarations_of(route) -> dict[str, MetricDeclaration]:
    """The route's outcome metrics as the analysis sees them: feedback metrics, and output checks (boolean, higher is better)."""
    checks = {name: MetricDeclaration("boolean") for name in route.checks}
    return checks | {name: MetricDeclaration(spec.type, spec.goal) for name, spec in route.metrics.items()}


def pick_candidate(route, candidate: str | None) -> str:
    """The candidate to judge: the one named, or the serving candidate with the largest weight."""
    candidates = route.candidate_arms()
    if candidate is not None:
        if candidate not in candidates:
            raise ValueError(f"--candidate {candidate!r} is not a candidate arm of the route; use one of {candidates}")
        return candidate
    serving = sorted((arm for arm in candidates if route.arms[arm].weight > 0), key=lambda arm: -route.arms[arm].weight)
    if not serving:
        raise ValueError(f"no candidate arm has a weight above 0; name one with --candidate (one of {candidates})")
    return serving[0]


def batch_means_by_arm(window: Window, arms: list[str], until: float, bucket_s: float) -> dict[str, dict[str, Mean]]:
    """Each arm's outcome metrics with one observation per time bucket: the bucket's mean (batch means)."""
    cuts = [min(window.start + k * bucket_s, until) for k in range(1, math.ceil((until - window.start) / bucket_s) + 1)]
    previous: dict[str, dict[str, Mean]] = {arm: {} for arm in arms}
    buckets: dict[str, dict[str, list[Mean]]] = {arm: {} for arm in arms}
    for cut in cuts:
        totals = summarise(window, arms, cut)
        for arm in arms:
            for metric, total in totals[arm].metrics.items():
                before = previous[arm].get(metric, Mean(0, 0.0, 0.0))
                bucket = Mean(total.n - before.n, total.sum - before.sum, max(total.sum_squares - before.sum_squares, 0.0))
                buckets[arm].setdefault(metric, []).append(bucket)
            previous[arm] = totals[arm].metrics
    return {arm: {metric: batch_means(values) for metric, values in per_metric.items()} for arm, per_metric in buckets.items()}


def analyze_route(config, route_name: str, source, start: float, end: float, candidate: str | None = None,
                  points: int = 0, bucket_s: float | None = None) -> tuple[Analysis, list[Analysis]]:
    """The analysis of one route over [start, end] from ``source``, and (``points`` > 0) the same at earlier cut times.

    With ``bucket_s`` the outcome metrics are tested on batch means (one observation per arm per
    bucket), which stays honest when sticky users send many correlated requests.
    """
    route = config.routes.get(route_name)
    if route is None:
        raise ValueError(f"route {route_name!r} is not in the traffic-split file; use one of {sorted(config.routes)}")
    if route.experiment is None:
        raise ValueError(f"route {route_name!r} has no `experiment:` block; add the analysis plan (see abtest/experiment.py)")
    candidate = pick_candidate(route, candidate)
    control = route.control_arm()
    window = read_window(source, route_name, start, end)
    names = list(route.arms)
    declarations = declarations_of(route)
    unit = "request"
    if bucket_s:
        # A bucket's mean is a real number even for a boolean metric, so every metric is tested as a mean.
        declarations = {name: MetricDeclaration("float", declaration.goal) for name, declaration in declarations.items()}
        unit = f"bucket of {bucket_s:g} s"

    def at(until: float) -> Analysis:
        arms = summarise(window, names, until)
        if bucket_s:
            means = batch_means_by_arm(window, names, until, bucket_s)
            arms = {arm: replace(stats, metrics=means[arm]) for arm, stats in arms.items()}
        return analyze(route_name, route.experiment, declarations, route.weights(), control, candidate, arms,
                       (start, until), window.errors, unit)

    history = [at(start + (end - start) * k / points) for k in range(1, points)] if points > 1 else []
    final = at(end)
    return final, [*history, final] if points > 1 else []


def format_text(result: Analysis) -> str:
    """The analysis as a terminal table with the verdict and its reasons."""
    def number(value, digits=4):
        if value is None:
            return "—"
        return f"{0.0 if abs(value) < 1e-12 else value:.{digits}g}"  # float noise of equal values prints as 0

    seconds = result.window[1] - result.window[0]
    lines = [
        f"route {result.route}: {result.candidate} (candidate) vs {result.control} (control), window {seconds / 60:.0f} min",
        f"requests per arm: {', '.join(f'{arm} {n}' for arm, n in result.arms.items())}",
        f"SRM: {result.srm.status}" + (f", p = {result.srm.p_value:.3g} ({'ok' if result.srm.ok else 'MISMATCH'})"
                                        if result.srm.p_value is not None else ""),
        "",
        f"{'metric':<18} {'role':<10} {'control':>9} {'candidate':>9} {'estimate':>9} {'interval':>21} {'p':>9} {'valid p':>9}  status",
    ]
    for row in result.metrics:
        interval = f"[{number(row.ci[0], 3)}, {number(row.ci[1], 3)}]" if row.ci else "—"
        lines.append(f"{row.name:<18} {row.role:<10} {number(row.control):>9} {number(row.candidate):>9} {number(row.estimate):>9} "
                     f"{interval:>21} {number(row.p_value, 3):>9} {number(row.always_valid_p_value, 3):>9}  {row.status}")
    lines += [
        "",
        f"planned samples per arm: {result.planned_samples_per_arm or '—'}; still needed: "
        f"{result.samples_needed if result.samples_needed is not None else '—'}",
        (f"unit: one request per observation (sticky assignment clusters a user's requests, so intervals are optimistic "
         f"when users send many: --unit bucket tests batch means instead)" if result.unit == "request" else
         f"unit: one {result.unit} per observation (its mean: batch means)"),
        *(f"source problem: {error}" for error in result.errors),
        "",
        f"verdict: {result.verdict.upper()}",
        *(f"  - {reason}" for reason in result.reasons),
    ]
    return "\n".join(lines)
