"""Generator of budgetflow's Grafana dashboard, helm/budgetflow/files/dashboard.json, with grafana-foundation-sdk.

Regenerate the checked-in JSON after any change here (tests/unit/test_dashboard.py checks they agree)::

    .venv/bin/python helm/dashboard.py > helm/budgetflow/files/dashboard.json

The dashboard stands on its own: it has a ``datasource`` variable (any Prometheus data
source) and a ``budget`` variable (multi-select, "All" is the regex ``.*``), so it can be
imported as is into any Grafana or provisioned from the Helm chart.

Query conventions, from how budgetflow exports its metrics:

* per-budget gauges (``budgetflow_budget_*``) come from the one aggregate worker that
  holds the budget's partition, so ``sum by (budget)`` is exact and filtered by
  ``budget=~"$budget"``;
* the heartbeat age is exported by every aggregate worker for every partition (each worker's
  view of the ledger heartbeats), so it is ``max by (partition)``, as in the alert rules;
* counters are read with ``rate(...[$__rate_interval])``; histograms with
  ``histogram_quantile`` over ``sum by (..., le)`` of their bucket rates.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import gauge, prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models
from grafana_foundation_sdk.models import prometheus as prometheus_models

UID = "budgetflow"
TITLE = "budgetflow: LLM spend budgets"

# Every panel and query reads from the data source picked in the `datasource` variable.
DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")
# Label matcher of the per-budget series; "All" is `.*` and a multi-selection `(a|b)`.
BUDGET = '{budget=~"$budget"}'
RATE = "[$__rate_interval]"

# Grafana unit ids.
USD = "currencyUSD"
PERCENT = "percent"  # 0..100
PERCENT_UNIT = "percentunit"  # 0..1
SECONDS = "s"
PER_SECOND = "cps"  # counts per second
COUNT = "short"

# budgetflow_budget_status: 0 normal, 1 soft limit passed, 2 hard limit reached.
STATUS_MAPPINGS: list[models.ValueMapping] = [
    models.ValueMap(
        options={
            "0": models.ValueMappingResult(text="normal", color="green", index=0),
            "1": models.ValueMappingResult(text="soft limit", color="orange", index=1),
            "2": models.ValueMappingResult(text="hard limit", color="red", index=2),
        }
    )
]

# budgetflow_router_view_ready: 1 once a router's budget view has caught up.
READY_MAPPINGS: list[models.ValueMapping] = [
    models.ValueMap(
        options={
            "0": models.ValueMappingResult(text="not ready", color="red", index=0),
            "1": models.ValueMappingResult(text="ready", color="green", index=1),
        }
    )
]

Query = tuple[str, str]  # (PromQL expression, legend format)


def queries(
    *items: Query, instant: bool = False, table_format: bool = False
) -> list[cogbuilder.Builder[cogvariants.Dataquery]]:
    """Prometheus targets with refIds A, B, C... in order."""
    targets: list[cogbuilder.Builder[cogvariants.Dataquery]] = []
    for index, (expr, legend_format) in enumerate(items):
        target = (
            prometheus.Dataquery()
            .ref_id(chr(ord("A") + index))
            .datasource(DATASOURCE)
            .editor_mode(prometheus_models.QueryEditorMode.CODE)
            .expr(expr)
            .legend_format(legend_format)
        )
        target = target.instant() if instant else target.range()
        if table_format:
            target = target.format(prometheus_models.PromQueryFormat.TABLE)
        targets.append(target)
    return targets


def thresholds(*steps: tuple[float | None, str]) -> dashboard_builders.ThresholdsConfig:
    """Absolute thresholds; the first step's value is None (the base colour)."""
    return (
        dashboard_builders.ThresholdsConfig()
        .mode(models.ThresholdsMode.ABSOLUTE)
        .steps([models.Threshold(value=value, color=color) for value, color in steps])
    )


def legend(*calcs: str) -> common_builders.VizLegendOptions:
    """A legend at the bottom: a table with the given reducers (e.g. "lastNotNull", "max") as columns, else a list."""
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE if calcs else common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
        .calcs(list(calcs))
    )


def tooltip() -> common_builders.VizTooltipOptions:
    return common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING)


def graph(title: str, description: str, unit: str, targets: Sequence[Query], *, width: int = 12) -> timeseries.Panel:
    """A time series panel with the house style: lines, table legend with last and max, shared tooltip."""
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(queries(*targets))
        .unit(unit)
        .span(width)
        .height(8)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(legend("lastNotNull", "max"))
        .tooltip(tooltip())
    )


def line_style(pattern: str, color: str) -> list[models.DynamicConfigValue]:
    """Override properties drawing a series as a dashed or dotted line of a fixed colour, unfilled."""
    dash = {"dash": [10.0, 10.0], "dot": [0.0, 10.0]}[pattern]
    return [
        models.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": pattern, "dash": dash}),
        models.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
        models.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color}),
    ]


def threshold_override(*steps: tuple[float | None, str]) -> models.DynamicConfigValue:
    """Override property: the field's own thresholds."""
    return models.DynamicConfigValue(id_val="thresholds", value=thresholds(*steps).build())


def mapping_override(mappings: list[models.ValueMapping]) -> models.DynamicConfigValue:
    """Override property: the field's own value mappings."""
    return models.DynamicConfigValue(id_val="mappings", value=mappings)


def fixed_color(color: str) -> list[models.DynamicConfigValue]:
    return [models.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})]


# ---------------------------------------------------------------------------------------------------
# Budgets: spend against the soft and hard limits, status, and a table of where each budget stands.
# ---------------------------------------------------------------------------------------------------


def spend_vs_limit() -> timeseries.Panel:
    return (
        graph(
            "Spend vs limit",
            "Month-to-date spend of each budget (settled + reserved), with its soft limit (dashed, orange) "
            "and hard limit (dotted, red).",
            USD,
            [
                (f"sum by (budget) (budgetflow_budget_spend_usd{BUDGET})", "{{budget}} spend"),
                (f"sum by (budget) (budgetflow_budget_soft_limit_usd{BUDGET})", "{{budget}} soft limit"),
                (f"sum by (budget) (budgetflow_budget_limit_usd{BUDGET})", "{{budget}} hard limit"),
            ],
            width=16,
        )
        .override_by_regexp(".* soft limit", line_style("dash", "orange"))
        .override_by_regexp(".* hard limit", line_style("dot", "red"))
    )


def utilization() -> gauge.Panel:
    return (
        gauge.Panel()
        .title("Utilization")
        .description("Spend as a percentage of the hard limit, now.")
        .datasource(DATASOURCE)
        .targets(
            queries((f"sum by (budget) (budgetflow_budget_utilization_percent{BUDGET})", "{{budget}}"), instant=True)
        )
        .unit(PERCENT)
        .min(0)
        .max(100)
        .decimals(1)
        .thresholds(thresholds((None, "green"), (80, "orange"), (100, "red")))
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .show_threshold_markers(True)
        .span(8)
        .height(8)
    )


def status_timeline() -> statetimeline.Panel:
    return (
        statetimeline.Panel()
        .title("Budget status")
        .description(
            "normal, soft limit (traffic shifts to local models) or hard limit (the hard-limit action applies)."
        )
        .datasource(DATASOURCE)
        .targets(queries((f"max by (budget) (budgetflow_budget_status{BUDGET})", "{{budget}}")))
        .mappings(STATUS_MAPPINGS)
        .color_scheme(dashboard_builders.FieldColor().mode(models.FieldColorModeId.THRESHOLDS))
        .thresholds(thresholds((None, "green"), (1, "orange"), (2, "red")))
        .show_value(common.VisibilityMode.AUTO)
        .merge_values(True)
        .row_height(0.9)
        .line_width(0)
        .fill_opacity(80)
        .legend(legend())
        .span(24)
        .height(6)
    )


def budgets_table() -> table.Panel:
    """One row per budget: the instant value of each per-budget gauge, joined on the budget label."""
    columns: list[tuple[str, str, str]] = [  # (metric, column title, unit)
        ("budgetflow_budget_spend_usd", "Spend", USD),
        ("budgetflow_budget_settled_usd", "Settled", USD),
        ("budgetflow_budget_reserved_usd", "Reserved", USD),
        ("budgetflow_budget_limit_usd", "Limit", USD),
        ("budgetflow_budget_projected_spend_usd", "Projected month end", USD),
        ("budgetflow_budget_utilization_percent", "Utilization", PERCENT),
        ("budgetflow_budget_requests", "Requests", COUNT),
        ("budgetflow_budget_projected_hard_limit_seconds", "Hard limit in", SECONDS),
        ("budgetflow_budget_reset_seconds", "Resets in", SECONDS),
    ]
    panel = (
        table.Panel()
        .title("Budgets now")
        .description(
            "Where each budget stands this month. 'Hard limit in' is the projected time until spend reaches the limit."
        )
        .datasource(DATASOURCE)
        .targets(
            queries(
                *[(f"sum by (budget) ({metric}{BUDGET})", "") for metric, _, _ in columns],
                instant=True,
                table_format=True,
            )
        )
        # The instant queries come back as one frame each; merge them into one row per budget.
        .with_transformation(models.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            models.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True},
                    "renameByName": {
                        "budget": "Budget",
                        **{f"Value #{chr(ord('A') + i)}": title for i, (_, title, _) in enumerate(columns)},
                    },
                    "indexByName": {},
                },
            )
        )
        .show_header(True)
        .cell_height(common.TableCellHeight.SM)
        .sort_by([common_builders.TableSortByFieldState().display_name("Utilization").desc(True)])
        .span(24)
        .height(8)
    )
    for _, title, unit in columns:
        properties = [models.DynamicConfigValue(id_val="unit", value=unit)]
        if title == "Utilization":  # coloured like the utilization gauge
            properties += [
                models.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-text"}),
                threshold_override((None, "green"), (80, "orange"), (100, "red")),
            ]
        panel = panel.override_by_name(title, properties)
    return panel


# ---------------------------------------------------------------------------------------------------
# Burn: how fast each budget spends and where that puts it at month end.
# ---------------------------------------------------------------------------------------------------


def burn_rate() -> timeseries.Panel:
    # deriv() (least squares) rather than rate(): spend is a gauge and it may step down when a
    # reservation settles below its estimate. clamp_min hides the monthly reset's drop to zero.
    return graph(
        "Burn rate (USD per hour)",
        "Slope of month-to-date spend, per hour.",
        USD,
        [(f"clamp_min(sum by (budget) (deriv(budgetflow_budget_spend_usd{BUDGET}{RATE})) * 3600, 0)", "{{budget}}")],
    )


def projected_spend() -> timeseries.Panel:
    return graph(
        "Projected month-end spend vs limit",
        "Spend projected to the end of the month at the current pace, against the hard limit (dotted, red).",
        USD,
        [
            (f"sum by (budget) (budgetflow_budget_projected_spend_usd{BUDGET})", "{{budget}} projected"),
            (f"sum by (budget) (budgetflow_budget_limit_usd{BUDGET})", "{{budget}} hard limit"),
        ],
    ).override_by_regexp(".* hard limit", line_style("dot", "red"))


# ---------------------------------------------------------------------------------------------------
# Cost and tokens.
# ---------------------------------------------------------------------------------------------------


def cost_per_request() -> timeseries.Panel:
    bucket_rate = f"sum by (model, le) (rate(budgetflow_cost_per_request_usd_bucket{RATE}))"
    return graph(
        "Cost per request by model",
        "Median and 95th percentile of the cost of one finished call, per model (all budgets, all backends).",
        USD,
        [
            (f"histogram_quantile(0.5, {bucket_rate})", "{{model}} p50"),
            (f"histogram_quantile(0.95, {bucket_rate})", "{{model}} p95"),
        ],
    ).override_by_regexp(
        ".* p95", [models.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10.0, 10.0]})]
    )


def tokens() -> timeseries.Panel:
    return graph(
        "Tokens by tier and kind",
        "Tokens counted per second, by counting tier (exact, approximate, heuristic, reported) and kind "
        "(input, cached, output, reasoning).",
        PER_SECOND,
        [(f"sum by (tier, kind) (rate(budgetflow_tokens_total{RATE}))", "{{tier}} {{kind}}")],
    ).stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))


# ---------------------------------------------------------------------------------------------------
# Routing.
# ---------------------------------------------------------------------------------------------------


def routing_share() -> timeseries.Panel:
    decisions = f"rate(budgetflow_router_decisions_total{RATE})"
    return (
        graph(
            "Routing share",
            "Share of routing decisions sent to cloud models, to local models, or rejected.",
            PERCENT_UNIT,
            [(f"sum by (outcome) ({decisions}) / ignoring (outcome) group_left sum({decisions})", "{{outcome}}")],
            width=16,
        )
        .stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
        .fill_opacity(60)
        .min(0)
        .max(1)
        .override_by_name("cloud", fixed_color("blue"))
        .override_by_name("local", fixed_color("green"))
        .override_by_name("rejected", fixed_color("red"))
    )


def leases() -> timeseries.Panel:
    return graph(
        "Leases",
        "Headroom of blocking (or strict) budgets leased to routers and not yet used, per budget; and the cloud "
        "requests that waited for a grant, or were refused because no lease covered them.",
        USD,
        [(f"sum by (budget) (budgetflow_budget_leased_usd{BUDGET})", "leased {{budget}}")],
        width=12,
    )


def lease_waits() -> timeseries.Panel:
    return graph(
        "Lease waits and refusals",
        "Cloud requests per second that waited for a lease grant, and that were refused when none came in time.",
        PER_SECOND,
        [
            (f"sum(rate(budgetflow_router_lease_waits_total{RATE}))", "waited"),
            (f"sum(rate(budgetflow_router_lease_refusals_total{RATE}))", "refused"),
        ],
        width=12,
    )


def router_view() -> stat.Panel:
    return (
        stat.Panel()
        .title("Router budget view")
        .description("Budgets known to the routers, and the most any router holds stale (no fresh status).")
        .datasource(DATASOURCE)
        .targets(
            queries(
                ("max(budgetflow_router_budgets)", "budgets"),
                ("max(budgetflow_router_stale_budgets)", "stale"),
                ("min(budgetflow_router_view_ready)", "ready"),
                instant=True,
            )
        )
        .unit(COUNT)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.NONE)
        .thresholds(thresholds((None, "green")))
        .override_by_name("stale", [threshold_override((None, "green"), (1, "orange"))])
        .override_by_name("ready", [mapping_override(READY_MAPPINGS)])
        .span(8)
        .height(8)
    )


# ---------------------------------------------------------------------------------------------------
# Data quality: dead letters, late ledger entries, unpriced requests.
# ---------------------------------------------------------------------------------------------------


def dead_letters() -> timeseries.Panel:
    return graph(
        "Dead letters",
        "Records sent to the dead-letter topic per second, by stage and reason.",
        PER_SECOND,
        [(f"sum by (stage, reason) (rate(budgetflow_dead_letters_total{RATE}))", "{{stage}} {{reason}}")],
        width=8,
    )


def late_entries() -> timeseries.Panel:
    return graph(
        "Late ledger entries",
        "Ledger entries per second too late to count (closed period or past the horizon), by reason.",
        PER_SECOND,
        [(f"sum by (reason) (rate(budgetflow_late_entries_total{RATE}))", "{{reason}}")],
        width=8,
    )


def unpriced() -> timeseries.Panel:
    return graph(
        "Unpriced requests",
        "Calls per second of models with no price (charged at fallback rates), by model.",
        PER_SECOND,
        [(f"sum by (model) (rate(budgetflow_unpriced_requests_total{RATE}))", "{{model}}")],
        width=8,
    )


# ---------------------------------------------------------------------------------------------------
# Pipeline health: throughput, lag, status propagation, aggregate heartbeats.
# ---------------------------------------------------------------------------------------------------


def throughput() -> timeseries.Panel:
    return graph(
        "Records by stage",
        "Records consumed (in) and produced (out) per second by each stage.",
        PER_SECOND,
        [(f"sum by (stage, direction) (rate(budgetflow_records_total{RATE}))", "{{stage}} {{direction}}")],
    )


def consumer_lag() -> timeseries.Panel:
    # max by (stage, partition) first: during a rebalance two consumers may briefly report one partition.
    return graph(
        "Consumer lag by stage",
        "Records behind the end of the input topic, summed over each stage's partitions.",
        COUNT,
        [("sum by (stage) (max by (stage, partition) (budgetflow_consumer_lag_records))", "{{stage}}")],
    )


def status_propagation() -> timeseries.Panel:
    bucket_rate = f"sum by (le) (rate(budgetflow_status_propagation_seconds_bucket{RATE}))"
    return graph(
        "Status propagation latency",
        "From a ledger entry reaching the broker to the budget status it moved being published.",
        SECONDS,
        [
            (f"histogram_quantile(0.5, {bucket_rate})", "p50"),
            (f"histogram_quantile(0.99, {bucket_rate})", "p99"),
        ],
    )


def heartbeat_age() -> timeseries.Panel:
    return (
        graph(
            "Heartbeat age by partition",
            "Seconds since each ledger partition's last heartbeat, the worst view over all aggregate workers.",
            SECONDS,
            [("max by (partition) (budgetflow_heartbeat_age_seconds)", "partition {{partition}}")],
        )
        .thresholds(thresholds((None, "green"), (60, "orange"), (300, "red")))
        .thresholds_style(common_builders.GraphThresholdsStyleConfig().mode(common.GraphTresholdsStyleMode.LINE))
    )


# ---------------------------------------------------------------------------------------------------
# The dashboard.
# ---------------------------------------------------------------------------------------------------


def variables() -> list[cogbuilder.Builder[models.VariableModel]]:
    return [
        dashboard_builders.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        dashboard_builders.QueryVariable("budget")
        .label("Budget")
        .datasource(DATASOURCE)
        .query("label_values(budgetflow_budget_spend_usd, budget)")
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(models.VariableOption(selected=True, text=["All"], value=["$__all"])),
    ]


def dashboard() -> models.Dashboard:
    """The dashboard model: rows of panels, laid out left to right by the builder."""
    rows: list[tuple[str, list[cogbuilder.Builder[models.Panel]]]] = [
        ("Budgets", [spend_vs_limit(), utilization(), status_timeline(), budgets_table()]),
        ("Burn and projection", [burn_rate(), projected_spend()]),
        ("Cost and tokens", [cost_per_request(), tokens()]),
        ("Routing", [routing_share(), router_view(), leases(), lease_waits()]),
        ("Data quality", [dead_letters(), late_entries(), unpriced()]),
        ("Pipeline", [throughput(), consumer_lag(), status_propagation(), heartbeat_age()]),
    ]
    builder = (
        dashboard_builders.Dashboard(TITLE)
        .uid(UID)
        .description("Exact LLM spend budgets on Kafka: spend against limits, burn, cost, routing and pipeline health.")
        .tags(["budgetflow", "llm", "kafka"])
        .editable()
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .time("now-24h", "now")
        .refresh("1m")
        .timezone("browser")
        .variables(variables())
    )
    for title, panels in rows:
        # An expanded row is followed by its panels at the top level (Grafana drops panels nested
        # in a row unless the row is collapsed), so add the row empty and then its panels.
        builder = builder.with_row(dashboard_builders.Row(title))
        for panel in panels:
            builder = builder.with_panel(panel)
    model = builder.build()
    # Stable panel ids, in layout order (the builder leaves them unset or 0).
    for number, built in enumerate(model.panels or [], start=1):
        built.id_val = number
    return model


def build() -> dict[str, Any]:
    """The dashboard as plain JSON data (what Grafana imports)."""
    data: dict[str, Any] = json.loads(json.dumps(dashboard(), cls=JSONEncoder))
    return data


def render() -> str:
    """The dashboard as deterministic JSON text: sorted keys, two-space indent, final newline."""
    return json.dumps(build(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
