"""The three Grafana dashboards of `amiforge export grafana`, built with grafana-foundation-sdk (Grafana's own
typed builders, Apache-2.0) rather than JSON templates: a panel is code, checked by mypy, and the JSON is what the
SDK emits for Grafana 11.

- executive: boot success (24 h), p95 time to ready, open vulnerabilities by version, rollouts in progress and how
  rollouts ended;
- on-call: recent failed boots with instance ids, replacements per minute, recent deploys and rollbacks, the burn
  rates against the SLOs;
- debug: each recent boot's time by instance, the time-to-ready distribution, pipeline runs (versions by state)
  and boot-test results.

Every panel reads Prometheus (a data source chosen by the `datasource` variable) with `image`, `version` and
`target` variables; `panel_queries` lists each query, which the e2e test runs against a real Prometheus.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from grafana_foundation_sdk.builders import dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard, DataSourceRef, Panel

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every version-level selector: the dashboard's variables, fleets only (boot tests have their own panel).
FLEET = 'image=~"$image", version=~"$version", target=~"$target", target!="boot-test"'
VERSION = 'image=~"$image", version=~"$version"'


@dataclass(frozen=True)
class Query:
    panel: str
    expr: str
    instant: bool


@dataclass(frozen=True)
class Board:
    uid: str
    title: str
    panels: tuple[tuple[str, Builder[Panel], Sequence[tuple[str, str]], bool], ...]  # title, panel, (expr, legend)


def _q(expr: str, legend: str, ref: str, *, instant: bool) -> prometheus.Dataquery:
    query = prometheus.Dataquery().ref_id(ref).expr(expr).datasource(DATASOURCE)
    if legend:
        query = query.legend_format(legend)
    return query.instant() if instant else query.range()


def _variables(board: dashboard.Dashboard) -> dashboard.Dashboard:
    source = dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    board = board.with_variable(source)
    for name, query in (
        ("image", "label_values(amiforge_version_info, image)"),
        ("version", 'label_values(amiforge_version_info{image=~"$image"}, version)'),
        ("target", "label_values(amiforge_boot_attempts_total, target)"),
    ):
        board = board.with_variable(
            dashboard.QueryVariable(name).label(name).query(query).datasource(DATASOURCE)
            .multi(True).include_all(True).all_value(".*")
        )  # fmt: skip
    return board


def _panel(kind: str, title: str, unit: str, queries: Sequence[tuple[str, str]], *, instant: bool, span: int = 12,
           height: int = 8) -> Builder[Panel]:  # fmt: skip
    builder: stat.Panel | table.Panel | timeseries.Panel
    if kind == "stat":
        builder = stat.Panel().reduce_options(ReduceDataOptions().calcs(["lastNotNull"]))
    elif kind == "table":
        builder = table.Panel()
    else:
        builder = timeseries.Panel()
    builder = builder.title(title).unit(unit).datasource(DATASOURCE).span(span).height(height)
    for i, (expr, legend) in enumerate(queries):
        builder = builder.with_target(_q(expr, legend, chr(ord("A") + i), instant=instant))
    return builder


def boards() -> list[Board]:
    boot_success_24h = (
        f'sum by (image, version) (increase(amiforge_boot_attempts_total{{{FLEET}, outcome="ready"}}[24h]))'
        f" / sum by (image, version) (increase(amiforge_boot_attempts_total{{{FLEET}}}[24h]))"
    )
    p95 = (
        "histogram_quantile(0.95, sum by (le, image, version) "
        f"(increase(amiforge_time_to_ready_seconds_bucket{{{FLEET}}}[24h])))"
    )
    rollouts = 'amiforge_rollouts_total{image=~"$image", target=~"$target"}'
    quantiles = (
        "histogram_quantile({q}, sum by (le) (rate(amiforge_time_to_ready_seconds_bucket{{{s}}}[$__rate_interval])))"
    )
    executive = (
        ("Boot success (24 h)", "stat", "percentunit", [(boot_success_24h, "{{version}}")], True),
        ("p95 time to ready (24 h)", "stat", "s", [(p95, "{{version}}")], True),
        ("Open vulnerabilities by version", "timeseries", "short",
         [(f"sum by (version, severity) (amiforge_vulnerabilities{{{VERSION}}})", "{{version}} {{severity}}")], False),
        ("Rollouts in progress", "stat", "short",
         [('amiforge_rollout_in_progress{image=~"$image", target=~"$target"}', "{{image}} on {{target}}")], True),
        ("How rollouts ended (canary status)", "table", "short",
         [(f"sum by (image, target, outcome) (increase({rollouts}[$__range]))", "")], True),
    )  # fmt: skip
    oncall = (
        ("Recent failed boots (instance ids)", "table", "s",
         [(f'amiforge_recent_boot_seconds{{{FLEET}, outcome!="ready"}}', "")], True),
        ("Replacements per minute", "timeseries", "short",
         [(f"sum by (version, target) (rate(amiforge_replacements_total{{{FLEET}}}[$__rate_interval])) * 60",
           "{{version}} on {{target}}")], False),
        ("Recent deploys and rollbacks", "timeseries", "short",
         [(f"sum by (image, target, outcome) (increase({rollouts}[$__rate_interval]))",
           "{{image}} on {{target}}: {{outcome}}"),
          ('sum by (image, target) (increase(amiforge_rollouts_undone_total{image=~"$image", target=~"$target"}'
           '[$__rate_interval]))', "{{image}} on {{target}}: undone by amiforge rollback"),
          ('amiforge_version_info{image=~"$image", channel!=""}', "{{channel}}: {{version}}")], False),
        ("Boot failures (share of launches, 5 m)", "timeseries", "percentunit",
         [(f'sum by (version, target) (rate(amiforge_boot_attempts_total{{{FLEET}, outcome!="ready"}}[5m]))'
           f" / sum by (version, target) (rate(amiforge_boot_attempts_total{{{FLEET}}}[5m]))",
           "{{version}} on {{target}}")], False),
        ("Boot logs: the last console lines of recent failed boots", "table", "short",
         [(f"amiforge_recent_boot_log_info{{{VERSION}, target=~\"$target\"}}", "")], True),
        ("Agent coverage (heartbeats)", "timeseries", "percentunit",
         [(f"sum by (version, target) (amiforge_heartbeat_instances{{{FLEET}}})"
           f" / sum by (version, target) (amiforge_instances{{{FLEET}}})", "{{version}} on {{target}}")], False),
    )  # fmt: skip
    debug = (
        ("Boot timeline: seconds to outcome, by instance", "table", "s",
         [(f"amiforge_recent_boot_seconds{{{VERSION}, target=~\"$target\"}}", "")], True),
        ("Boot phases by instance (the guest's systemd: kernel, userspace, slowest units)", "table", "s",
         [(f"amiforge_recent_boot_phase_seconds{{{VERSION}, target=~\"$target\"}}", "")], True),
        ("Time to ready (p50, p95, p99)", "timeseries", "s",
         [(quantiles.format(q=q, s=FLEET), f"p{round(q * 100)}") for q in (0.5, 0.95, 0.99)], False),
        ("Pipeline runs: versions by state", "table", "short",
         [('amiforge_versions{image=~"$image"}', "")], True),
        ("Boot tests by outcome", "table", "short",
         [(f'sum by (version, outcome) (amiforge_boot_attempts_total{{{VERSION}, target="boot-test"}})', "")], True),
    )  # fmt: skip
    found = []
    for uid, title, panels in (
        ("amiforge-executive", "amiforge — executive", executive),
        ("amiforge-oncall", "amiforge — on-call", oncall),
        ("amiforge-debug", "amiforge — debug", debug),
    ):
        built = tuple((t, _panel(kind, t, unit, qs, instant=inst), qs, inst) for t, kind, unit, qs, inst in panels)
        found.append(Board(uid, title, built))
    return found


def build(board: Board) -> Dashboard:
    builder = (
        dashboard.Dashboard(board.title).uid(board.uid).tags(["amiforge"]).refresh("30s").time("now-24h", "now")
        .timezone("utc").editable()
    )  # fmt: skip
    builder = _variables(builder)
    for _title, panel, _queries, _instant in board.panels:
        builder = builder.with_panel(panel)
    return builder.build()


def dashboard_json(board: Board) -> str:
    return json.dumps(json.loads(JSONEncoder(sort_keys=True, indent=2).encode(build(board))), indent=2, sort_keys=True)


def panel_queries() -> list[Query]:
    """Every query of every panel of every dashboard (for testing them against Prometheus)."""
    return [Query(f"{b.uid}: {title}", expr, instant) for b in boards() for title, _, qs, instant in b.panels
            for expr, _ in qs]  # fmt: skip
