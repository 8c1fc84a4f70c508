"""The analysis as one self-contained HTML file: the verdict, the table, and matplotlib plots as inline SVG.

Plots: each tested metric per arm with its interval; the primary metric's always-valid p-value
and confidence sequence over the window; the configured split against the requests each arm got.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: render to SVG in memory
import matplotlib.pyplot as plt  # noqa: E402

from abtest.analysis import Analysis, format_text  # noqa: E402

VERDICT_COLOURS = {"promote": "#1a7f37", "rollback": "#cf222e", "continue": "#9a6700", "inconclusive": "#57606a"}


def _svg(figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _arms_plot(result: Analysis) -> str:
    rows = [row for row in result.metrics if row.role != "guardrail" and row.control_ci and row.candidate_ci]
    figure, axes = plt.subplots(1, max(len(rows), 1), figsize=(4 * max(len(rows), 1), 3), squeeze=False)
    for axis, row in zip(axes[0], rows):
        for x, (arm, mean, (low, high)) in enumerate([(result.control, row.control, row.control_ci),
                                                      (result.candidate, row.candidate, row.candidate_ci)]):
            # Clamped: at a rate of exactly 0 or 1 the interval's bound may round to just inside the mean.
            axis.errorbar([x], [mean], yerr=[[max(mean - low, 0.0)], [max(high - mean, 0.0)]], fmt="o", capsize=6, color=f"C{x}")
        axis.set_xticks([0, 1], [result.control, result.candidate])
        axis.set_xlim(-0.6, 1.6)
        axis.set_title(f"{row.name} ({row.role})")
        axis.set_ylabel("mean per observation, 95% interval")
    if not rows:
        axes[0][0].text(0.5, 0.5, "no tested metric has data yet", ha="center", va="center")
        axes[0][0].set_axis_off()
    return _svg(figure)


def _history_plot(result: Analysis, history: list[Analysis]) -> str:
    figure, (p_axis, cs_axis) = plt.subplots(1, 2, figsize=(10, 3.2))
    primary = [(h.window[1], next(r for r in h.metrics if r.role == "primary")) for h in history]
    minutes = [(t - result.window[0]) / 60 for t, _ in primary]
    p_values = [row.always_valid_p_value for _, row in primary]
    alpha = next((row for row in result.metrics if row.role == "primary"), None)
    p_axis.plot(minutes, [p if p is not None else float("nan") for p in p_values], marker=".", label="always-valid p")
    p_axis.plot(minutes, [row.p_value if row.p_value is not None else float("nan") for _, row in primary], marker=".",
                alpha=0.5, label="fixed-horizon p (invalid when peeking)")
    p_axis.axhline(0.05, color="grey", linestyle="--", linewidth=1, label="alpha")
    p_axis.set_yscale("log")
    p_axis.set_xlabel("minutes into the window")
    p_axis.set_title(f"{alpha.name if alpha else 'primary'}: p-value over time")
    p_axis.legend(fontsize=7)
    lows = [row.ci[0] if row.ci else float("nan") for _, row in primary]
    highs = [row.ci[1] if row.ci else float("nan") for _, row in primary]
    estimates = [row.estimate if row.estimate is not None else float("nan") for _, row in primary]
    cs_axis.fill_between(minutes, lows, highs, alpha=0.3, label="confidence sequence")
    cs_axis.plot(minutes, estimates, marker=".", label="candidate - control")
    cs_axis.axhline(0, color="grey", linewidth=1)
    cs_axis.set_xlabel("minutes into the window")
    cs_axis.set_title("difference and its confidence sequence")
    cs_axis.legend(fontsize=7)
    return _svg(figure)


def _split_plot(result: Analysis, weights: dict[str, float]) -> str:
    arms = [arm for arm in weights if weights[arm] > 0 or result.arms.get(arm)]
    total_weight = sum(weights[arm] for arm in arms) or 1
    total = sum(result.arms.get(arm, 0) for arm in arms) or 1
    figure, axis = plt.subplots(figsize=(5, 3))
    xs = range(len(arms))
    axis.bar([x - 0.2 for x in xs], [weights[arm] / total_weight for arm in arms], width=0.4, label="configured")
    axis.bar([x + 0.2 for x in xs], [result.arms.get(arm, 0) / total for arm in arms], width=0.4, label="actual")
    axis.set_xticks(list(xs), arms)
    axis.set_ylabel("share of requests")
    axis.set_title(f"split (SRM p = {result.srm.p_value:.3g})" if result.srm.p_value is not None else "split")
    axis.legend(fontsize=7)
    return _svg(figure)


def write_html(path: Path, result: Analysis, history: list[Analysis], weights: dict[str, float]) -> Path:
    """Write the report to ``path`` (one file, no external resources) and return it."""
    colour = VERDICT_COLOURS.get(result.verdict, "#000")
    reasons = "".join(f"<li>{html.escape(reason)}</li>" for reason in result.reasons)
    history_svg = _history_plot(result, history) if len(history) > 1 else "<p>One look only: run again later for the history.</p>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>A/B analysis: {html.escape(result.route)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}} pre{{background:#f6f8fa;padding:1em;overflow-x:auto}}
.verdict{{font-size:1.6em;font-weight:bold;color:{colour}}} svg{{max-width:100%;height:auto}}</style></head>
<body>
<h1>Route {html.escape(result.route)}: {html.escape(result.candidate)} vs {html.escape(result.control)}</h1>
<p class="verdict">Verdict: {html.escape(result.verdict)}</p>
<ul>{reasons}</ul>
<h2>Metrics per arm</h2>
{_arms_plot(result)}
<h2>Primary metric over time</h2>
{history_svg}
<h2>Configured and actual split</h2>
{_split_plot(result, weights)}
<h2>Table</h2>
<pre>{html.escape(format_text(result))}</pre>
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
