"""Data ablation (playbook practice 8): the same config on nested fractions of the training data.

``stillhouse ablate --fractions 5,10,25,50,75,100`` trains one adapter per fraction on a prefix of
one seeded ordering of the curated training split (so every smaller subset is contained in every
larger one), scores each on the same held-out rows through a scratch server (the embedded server
behind `stillhouse serve`, scored as `stillhouse eval` scores; see :mod:`training.scratch_server`),
and fits a saturating power law

    score(n) = a − b · n^(−c)        (a in [0, 1], b ≥ 0, c in (0, 3])

with ``scipy.optimize.curve_fit``. The extrapolated score at 2× the data carries a 95% interval
from the delta method on the fit's parameter covariance (residual-scaled, i.e. ``absolute_sigma``
off): var f(n) = ∇f(n)ᵀ Σ ∇f(n), with ∇f = (1, −n^(−c), b·n^(−c)·ln n). With few points the
interval is wide; it measures the fit's uncertainty, not the test-set noise of each point (that
is reported per point as a Wilson interval).

Degenerate inputs never raise: :func:`fit_power_law` returns a :class:`PowerLawFit` whose
``status`` is one of ``ok``, ``too_few_points``, ``flat``, ``fit_failed`` or ``no_covariance``.

Writes ``runs/<name>/ablation/``: ``ablation.json``, ``ablation.md``, ``ablation.svg`` (plot),
and each fraction's ``<pct>/train`` (adapter, loss curve) and ``<pct>/eval.json`` (the evaluation
report, as `stillhouse eval` writes it). Ablation adapters are not registered (the scratch
server's registry is thrown away).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from training import dataset, lora, trainer
from training.config import RunConfig
from training.evaluation import Z95, EvalReport
from training.row import Row
from training.scratch_server import ScratchServer, scratch_server
from training.task import Task, load_task

Say = Callable[[str], None]

STATUSES = ("ok", "too_few_points", "flat", "fit_failed", "no_covariance")
MIN_POINTS = 4  # three parameters; one more leaves a residual degree of freedom for the covariance


# --- the fit (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted ``a − b·n^(−c)``; ``status`` says whether (and how far) it can be trusted."""

    status: str
    a: float | None
    b: float | None
    c: float | None
    covariance: list[list[float]] | None
    points: int
    message: str

    def predict(self, n: float) -> float | None:
        if self.a is None:
            return None
        return self.a - self.b * n ** (-self.c)

    def interval(self, n: float, z: float = Z95) -> tuple[float, float] | None:
        """Delta-method interval of the fitted curve at ``n`` (None without a covariance)."""
        if self.covariance is None or self.a is None:
            return None
        gradient = np.array([1.0, -(n ** -self.c), self.b * n ** -self.c * math.log(n)])
        variance = float(gradient @ np.array(self.covariance) @ gradient)
        if not math.isfinite(variance) or variance < 0:
            return None
        centre, half = self.predict(n), z * math.sqrt(variance)
        return centre - half, centre + half

    def to_dict(self) -> dict:
        return asdict(self)


def power_law(n, a, b, c):
    return a - b * np.power(n, -c)


def fit_power_law(sizes: Sequence[float], scores: Sequence[float], upper: float = 1.0) -> PowerLawFit:
    """Fit ``score(n) = a − b·n^(−c)`` with bounded parameters; never raises on degenerate data.

    ``upper`` bounds the asymptote ``a`` (1.0 for proportions).
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    x = np.asarray(sizes, dtype=float)
    y = np.asarray(scores, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    points = len(np.unique(x))
    if points < MIN_POINTS:
        return PowerLawFit("too_few_points", None, None, None, None, points, f"{points} distinct sizes; a 3-parameter fit needs at least {MIN_POINTS}")
    if float(np.ptp(y)) < 1e-12:
        mean = float(y.mean())
        return PowerLawFit("flat", mean, 0.0, 1.0, None, points, f"every score is {mean:.4f}; no trend to extrapolate")
    c0 = 0.5
    a0 = min(upper, float(y.max()) + 0.01)
    b0 = max(1e-6, (a0 - float(y.min())) * float(x.min()) ** c0)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", OptimizeWarning)
            params, covariance = curve_fit(
                power_law, x, y, p0=[a0, b0, c0], bounds=([0.0, 0.0, 1e-3], [upper, np.inf, 3.0]), maxfev=20000
            )
    except OptimizeWarning as warning:
        return PowerLawFit("no_covariance", *_refit_without_covariance(x, y, a0, b0, c0, upper), None, points, str(warning))
    except (RuntimeError, ValueError) as error:
        return PowerLawFit("fit_failed", None, None, None, None, points, str(error))
    a, b, c = (float(value) for value in params)
    if not np.all(np.isfinite(covariance)):
        return PowerLawFit("no_covariance", a, b, c, None, points, "the parameter covariance is not finite (parameters not identifiable)")
    return PowerLawFit("ok", a, b, c, covariance.tolist(), points, "")


def _refit_without_covariance(x, y, a0, b0, c0, upper) -> tuple:
    from scipy.optimize import curve_fit

    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = curve_fit(power_law, x, y, p0=[a0, b0, c0], bounds=([0.0, 0.0, 1e-3], [upper, np.inf, 3.0]), maxfev=20000)
        return tuple(float(value) for value in params)
    except (RuntimeError, ValueError):
        return None, None, None


# --- nested subsets (pure) -------------------------------------------------------------------


def nested_subsets(rows: list[Row], fractions: Sequence[float], seed: int) -> dict[float, list[Row]]:
    """Prefixes of one seeded ordering of ``rows`` (by id hash), one per fraction in percent."""
    order = sorted(rows, key=lambda row: hashlib.sha256(f"{seed}:{row.id}".encode()).hexdigest())
    subsets = {}
    for fraction in fractions:
        if not 0 < fraction <= 100:
            raise ValueError(f"fraction {fraction} is not in (0, 100]")
        subsets[fraction] = order[: max(1, round(fraction / 100 * len(order)))]
    return subsets


def parse_fractions(text: str) -> list[float]:
    values = sorted({float(part) for part in text.split(",") if part.strip()})
    if not values or any(not 0 < value <= 100 for value in values):
        raise ValueError(f"--fractions {text!r}: give percentages in (0, 100], e.g. 5,10,25,50,75,100")
    return values


def plateau(sizes: Sequence[float], scores: Sequence[float], tolerance: float = 0.005, min_points: int = 3) -> dict | None:
    """The flat tail of a curve: the smallest size from which the last ``min_points`` or more scores
    all lie within ``tolerance`` of the largest size's score; None when the tail still moves.

    A saturated curve says more data of the same kind will not help (the labels or the task cap
    the score), whatever a fitted power law extrapolates.
    """
    ordered = sorted(zip(sizes, scores))
    final = ordered[-1][1]
    tail = 0
    for _, score_value in reversed(ordered):
        if abs(score_value - final) > tolerance:
            break
        tail += 1
    if tail < min_points:
        return None
    return {"from_rows": ordered[-tail][0], "score": final, "points": tail}


# --- training and scoring one configuration ------------------------------------------------


def train_and_score(
    server: ScratchServer, task: Task, rows: list[Row], test_rows: list[Row], base_dir: Path, config: RunConfig, directory: Path, say: Say
) -> tuple[trainer.TrainResult, EvalReport]:
    """Train ``config`` on ``rows`` into ``directory/train`` and score the adapter on ``test_rows``
    through the scratch server, as `stillhouse eval` would; writes ``directory/eval.json``."""
    result = trainer.train(rows, task, base_dir, config.lora, config.train, directory / "train", say=say)
    report = server.score(task, test_rows, result.adapter_dir)
    (directory / "eval.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return result, report


# --- the ablation run ------------------------------------------------------------------------


def prepare_data(config: RunConfig, task: Task, say: Say) -> tuple[list[Row], list[Row]]:
    """The run's curated (train, test) rows, building and curating them first when absent."""
    from training import recipe

    data_dir = config.run_dir / "data"
    if not (data_dir / "card.json").is_file():
        recipe.build(config, task, say)
        if config.teacher is not None:
            recipe.label_rows(config, task, config.teacher, say)
        recipe.curate(config, task, say)
    return dataset.read_rows(data_dir / "train.jsonl"), dataset.read_rows(data_dir / "test.jsonl")


def ablate(config: RunConfig, fractions: Sequence[float], say: Say, eval_limit: int | None = None) -> dict:
    """Train ``config`` on each nested fraction of its training data, score on the same test rows, fit, report."""
    from serving import base_models

    task = load_task(config.task)
    base_dir = base_models.provision(config.base)
    lora.require_servable(config.lora, base_dir)
    train_rows, test_rows = prepare_data(config, task, say)
    test_rows = test_rows[:eval_limit]
    out_dir = config.run_dir / "ablation"
    out_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")

    primary = task.primary_metric
    points = []
    with scratch_server(base_dir, config.lora.profile) as server:
        for fraction, subset in nested_subsets(train_rows, fractions, config.train.seed).items():
            label = f"{fraction:g}"
            say(f"ablation {label}%: training on {len(subset)} of {len(train_rows)} rows")
            started = time.perf_counter()
            result, scored = train_and_score(server, task, subset, test_rows, base_dir, config, out_dir / label, say)
            metric = scored.metric(primary)
            points.append({
                "fraction": fraction, "rows": len(subset), "steps": result.steps, "final_loss": result.final_loss,
                primary: metric.value, "ci95": [metric.low, metric.high], "test_rows": metric.n,
                "seconds": round(time.perf_counter() - started, 2),
            })
            say(f"ablation {label}%: {primary} {metric.value:.3f} [{metric.low:.3f}, {metric.high:.3f}]")

    fit = fit_power_law([p["rows"] for p in points], [p[primary] for p in points])
    full = max(p["rows"] for p in points)
    at_double = {"rows": 2 * full, "score": fit.predict(2 * full), "ci95": fit.interval(2 * full)}
    report = {
        "task": task.name, "base": config.base, "metric": primary, "points": points, "fit": fit.to_dict(),
        "plateau": plateau([p["rows"] for p in points], [p[primary] for p in points]),
        "extrapolation": at_double, "interval_method": "delta method on the curve_fit parameter covariance (residual-scaled)",
        "config": config.model_dump(mode="json"),
    }
    (out_dir / "ablation.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "ablation.md").write_text(ablation_markdown(report))
    (out_dir / "ablation.svg").write_text(ablation_svg(report))
    say(f"wrote {out_dir / 'ablation.md'}, ablation.json, ablation.svg")
    return report


def ablation_markdown(report: dict) -> str:
    metric, fit, extra = report["metric"], report["fit"], report["extrapolation"]
    lines = [
        f"# Data ablation: {report['task']} on {report['base']}", "",
        "Same config on nested subsets of the curated training split (smaller subsets are prefixes of larger ones), "
        "each scored on the same held-out rows.", "",
        f"| fraction % | train rows | steps | final loss | {metric} [95% Wilson CI] | test rows |",
        "|---|---|---|---|---|---|",
    ]
    for p in report["points"]:
        lines.append(f"| {p['fraction']:g} | {p['rows']} | {p['steps']} | {p['final_loss']:.4f} | "
                     f"{p[metric]:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] | {p['test_rows']} |")
    lines += ["", f"Fit `{metric}(n) = a − b·n^(−c)`: status **{fit['status']}**" + (f" ({fit['message']})" if fit["message"] else "")]
    if fit["a"] is not None:
        lines.append(f"a = {fit['a']:.4f}, b = {fit['b']:.4g}, c = {fit['c']:.4f}")
    if extra["score"] is not None:
        interval = extra["ci95"]
        shown = f" [{interval[0]:.3f}, {interval[1]:.3f}] (95%, {report['interval_method']})" if interval else f" (no interval: fit status {fit['status']})"
        lines.append(f"\nExtrapolated {metric} at 2× the data ({extra['rows']} rows): **{extra['score']:.3f}**{shown}.")
    flat = report.get("plateau")
    if flat:
        lines.append(
            f"\nPlateau: the last {flat['points']} points, from {flat['from_rows']} rows on, all score {flat['score']:.3f} "
            "(within 0.005): more rows of this data are unlikely to help whatever the fit extrapolates; "
            "look at the mistakes (`stillhouse review`) and at the labels."
        )
    return "\n".join(lines) + "\n"


def ablation_svg(report: dict, width: int = 560, height: int = 360) -> str:
    """A self-contained SVG plot: points with their CIs, the fitted curve, and the 2× extrapolation."""
    metric, points, fit = report["metric"], report["points"], report["fit"]
    left, right, top, bottom = 60, 20, 30, 50
    xs = [p["rows"] for p in points] + [report["extrapolation"]["rows"]]
    x_max = max(xs) * 1.05
    sx = lambda n: left + (width - left - right) * n / x_max  # noqa: E731
    sy = lambda v: top + (height - top - bottom) * (1 - max(0.0, min(1.0, v)))  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="13">{metric} vs training rows</text>',
             f'<line x1="{left}" y1="{sy(0)}" x2="{width - right}" y2="{sy(0)}" stroke="black"/>',
             f'<line x1="{left}" y1="{sy(0)}" x2="{left}" y2="{sy(1)}" stroke="black"/>']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{left - 6}" y="{sy(tick) + 4}" text-anchor="end">{tick:.2f}</text>')
        parts.append(f'<line x1="{left}" y1="{sy(tick)}" x2="{width - right}" y2="{sy(tick)}" stroke="#eee"/>')
    for tick in np.linspace(0, max(xs), 5):
        parts.append(f'<text x="{sx(tick)}" y="{sy(0) + 16}" text-anchor="middle">{tick:.0f}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">training rows</text>')
    if fit["a"] is not None:
        curve = PowerLawFit(**fit)
        grid = np.linspace(min(xs) * 0.5, max(xs), 80)
        path = " ".join(f"{'M' if i == 0 else 'L'}{sx(n):.1f},{sy(curve.predict(n)):.1f}" for i, n in enumerate(grid))
        parts.append(f'<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
    for p in points:
        x = sx(p["rows"])
        parts.append(f'<line x1="{x:.1f}" y1="{sy(p["ci95"][0]):.1f}" x2="{x:.1f}" y2="{sy(p["ci95"][1]):.1f}" stroke="#555"/>')
        parts.append(f'<circle cx="{x:.1f}" cy="{sy(p[metric]):.1f}" r="3.5" fill="#d62728"/>')
    extra = report["extrapolation"]
    if extra["score"] is not None:
        x = sx(extra["rows"])
        if extra["ci95"]:
            parts.append(f'<line x1="{x:.1f}" y1="{sy(extra["ci95"][0]):.1f}" x2="{x:.1f}" y2="{sy(extra["ci95"][1]):.1f}" stroke="#1f77b4" stroke-dasharray="3,2"/>')
        parts.append(f'<rect x="{x - 4:.1f}" y="{sy(extra["score"]) - 4:.1f}" width="8" height="8" fill="none" stroke="#1f77b4"/>')
        parts.append(f'<text x="{x - 6:.1f}" y="{sy(extra["score"]) - 8:.1f}" text-anchor="end">2×: {extra["score"]:.3f}</text>')
    parts.append(f'<text x="{width - right}" y="{top + 4}" text-anchor="end" fill="#555">fit: {fit["status"]}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
