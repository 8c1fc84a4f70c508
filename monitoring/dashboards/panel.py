"""Dashboards as data: panels with their queries, rendered to Grafana JSON with grafana-foundation-sdk.

A ``Panel`` keeps its PromQL (``Query``) next to what the live test may expect of the answer
(the labels every series carries, and the range of a plausible value), so the same objects
build the JSON and prove every query against a real Prometheus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from grafana_foundation_sdk.builders import dashboard as builder
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

DATASOURCE_UID = "stillhouse-prometheus"  # the provisioned datasource (monitoring/grafana/provisioning)
DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel, with what its answer must look like."""

    expr: str
    legend: str
    labels: tuple[str, ...] = ()  # label names every returned series carries
    low: float = 0.0  # the range of a plausible value
    high: float = float("inf")
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    """A Grafana panel: every panel names its unit and says in one line what it shows."""

    title: str
    description: str
    unit: str  # a Grafana unit id: reqps, s, percentunit, short, none
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or stat
    width: int = 12
    height: int = 8


@dataclass(frozen=True)
class Variable:
    """A template variable filled from a label's values (``label_values(query, label)``)."""

    name: str
    label: str
    query: str


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[Variable, ...] = ()
    tags: tuple[str, ...] = field(default=("stillhouse",))

    def queries(self) -> list[tuple[Panel, Query]]:
        return [(panel, query) for panel in self.panels for query in panel.queries]


def _panel_builder(panel: Panel):
    kind = {"timeseries": timeseries.Panel, "stat": stat.Panel}[panel.kind]
    built = kind().title(panel.title).description(panel.description).unit(panel.unit).datasource(DATASOURCE)
    built = built.height(panel.height).span(panel.width)
    for index, query in enumerate(panel.queries):
        target = prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(chr(ord("A") + index))
        built = built.with_target(target.instant() if query.instant else target)
    return built


def render(spec: Dashboard) -> dict:
    """The dashboard's JSON model, as Grafana's provisioning reads it."""
    board = (
        builder.Dashboard(spec.title).uid(spec.uid).description(spec.description).tags(list(spec.tags))
        .time("now-1h", "now").refresh("30s").readonly()
    )
    for variable in spec.variables:
        board = board.with_variable(
            builder.QueryVariable(variable.name).label(variable.label).datasource(DATASOURCE)
            .query(f"label_values({variable.query})").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        )
    for panel in spec.panels:  # the builder lays panels out left to right, wrapping at 24 columns
        board = board.with_panel(_panel_builder(panel))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))
