"""The Grafana dashboard is generated, valid for grafana-foundation-sdk's models, and its PromQL parses.

helm/dashboard.py builds the dashboard; helm/budgetflow/files/dashboard.json is its
checked-in output. These tests need no network and no broker; the PromQL check runs
Prometheus's own ``promtool check rules`` on the queries written as recording rules.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dashboard_models
from grafana_foundation_sdk.models import prometheus as prometheus_models

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "helm" / "dashboard.py"
DASHBOARD = ROOT / "helm" / "budgetflow" / "files" / "dashboard.json"
PROMTOOL = shutil.which("promtool")

# What budgetflow exports (streams/service/metrics.py, streams/aggregate/metrics.py, streams/gateway/metrics.py, streams/enrich/worker.py), by metric family.
GAUGES = {
    "budgetflow_budget_spend_usd",
    "budgetflow_budget_settled_usd",
    "budgetflow_budget_reserved_usd",
    "budgetflow_budget_limit_usd",
    "budgetflow_budget_soft_limit_usd",
    "budgetflow_budget_utilization_percent",
    "budgetflow_budget_status",
    "budgetflow_budget_reset_seconds",
    "budgetflow_budget_projected_spend_usd",
    "budgetflow_budget_projected_hard_limit_seconds",
    "budgetflow_budget_requests",
    "budgetflow_budget_leased_usd",
    "budgetflow_reservations_open",
    "budgetflow_consumer_lag_records",
    "budgetflow_heartbeat_age_seconds",
    "budgetflow_router_budgets",
    "budgetflow_router_stale_budgets",
    "budgetflow_router_view_ready",
    "budgetflow_publisher_buffered",
    "budgetflow_publisher_spool_bytes",
}
COUNTERS = {  # exposed with a _total suffix
    "budgetflow_records",
    "budgetflow_dead_letters",
    "budgetflow_unknown_fields",
    "budgetflow_unpriced_requests",
    "budgetflow_tokens",
    "budgetflow_ledger_entries",
    "budgetflow_budget_events",
    "budgetflow_late_entries",
    "budgetflow_reservations_expired",
    "budgetflow_statuses_published",
    "budgetflow_router_decisions",
    "budgetflow_router_lease_waits",
    "budgetflow_router_lease_refusals",
    "budgetflow_publisher_events",
}
HISTOGRAMS = {  # exposed as _bucket, _sum and _count
    "budgetflow_cost_per_request_usd",
    "budgetflow_token_count_duration_seconds",
    "budgetflow_status_propagation_seconds",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

METRIC_NAME = re.compile(r"\bbudgetflow_[a-zA-Z0-9_]*")

# Grafana variables and the values they take for the syntax check.
SUBSTITUTIONS = {
    "${budget}": ".*",
    "$budget": ".*",
    "$__rate_interval": "5m",
    "$__interval": "5m",
}


# --------------------------------------------------------------------------- helpers


def load_generator() -> ModuleType:
    """helm/dashboard.py, imported by path (helm/ is not a package)."""
    spec = importlib.util.spec_from_file_location("budgetflow_dashboard_generator", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def checked_in() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every panel, rows included, with the panels of collapsed rows after their row."""
    found: list[dict[str, Any]] = []
    for panel in panels:
        found.append(panel)
        found.extend(all_panels(panel.get("panels") or []))
    return found


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [target for panel in all_panels(data["panels"]) for target in panel.get("targets") or []]


def expressions(data: dict[str, Any]) -> list[str]:
    """The PromQL of every panel target, in dashboard order."""
    return [target["expr"] for target in targets(data)]


def substitute(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def dashboard_metric_names() -> set[str]:
    """Every budgetflow_* series name the dashboard's queries use (panel targets and template variables)."""
    data = checked_in()
    variable_queries = [
        variable["query"] for variable in data["templating"]["list"] if isinstance(variable.get("query"), str)
    ]
    return {name for text in [*expressions(data), *variable_queries] for name in METRIC_NAME.findall(text)}


def family(series: str) -> str:
    """The metric family of an exposed series name (counter ``_total``, histogram ``_bucket``...)."""
    if series.endswith("_total") and series.removesuffix("_total") in COUNTERS:
        return series.removesuffix("_total")
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and series.removesuffix(suffix) in HISTOGRAMS:
            return series.removesuffix(suffix)
    return series


def exposed_series() -> set[str]:
    """Every series name budgetflow exposes."""
    return (
        GAUGES
        | {f"{counter}_total" for counter in COUNTERS}
        | {f"{histogram}{suffix}" for histogram in HISTOGRAMS for suffix in HISTOGRAM_SUFFIXES}
    )


@pytest.fixture(scope="module")
def promtool() -> str:
    if PROMTOOL is None:
        pytest.fail(
            "promtool is not installed, so the dashboard's PromQL cannot be checked: "
            "`make setup` installs Debian's prometheus package",
            pytrace=False,
        )
    return PROMTOOL


# --------------------------------------------------------------------------- (a) generated


def test_checked_in_json_is_the_generator_output() -> None:
    generator = load_generator()
    assert checked_in() == generator.build(), (
        "helm/budgetflow/files/dashboard.json is stale: run "
        "`.venv/bin/python helm/dashboard.py > helm/budgetflow/files/dashboard.json`"
    )
    # Byte for byte too: the file is exactly what the script prints.
    assert DASHBOARD.read_text(encoding="utf-8") == generator.render()


# --------------------------------------------------------------------------- (b) SDK model


def test_json_round_trips_through_the_sdk_dashboard_model() -> None:
    """Decode with the SDK's typed models and encode again: nothing is lost, renamed or mistyped.

    ``Dashboard.from_json`` keeps only the fields the schema knows, decodes panel options and
    field config through each panel plugin's model and targets through the data source's
    query model (with the plugins registered); so an exact round trip means every key is one
    the schema defines, under its exact name.
    """
    plugins.register_default_plugins()
    data = checked_in()
    model = dashboard_models.Dashboard.from_json(data)
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == data

    panels = model.panels or []
    json_panels = data["panels"]
    assert len(panels) == len(json_panels) > 0
    n_targets = 0
    for decoded, original in zip(panels, json_panels, strict=True):
        assert decoded.type_val == original["type"]
        assert decoded.title == original["title"]
        assert decoded.id_val == original["id"]
        if isinstance(decoded, dashboard_models.RowPanel):
            assert original["type"] == "row"
            assert not decoded.collapsed
            assert decoded.panels == []  # an expanded row's panels follow it at the top level
            continue
        # Options (and custom field config, for plugins that have one) were decoded by the panel
        # plugin's own model, not kept as raw dicts: the SDK knows the panel type.
        config = cogruntime.panelcfg_config(original["type"])
        assert config is not None, f"the SDK has no model for panel type {original['type']!r}"
        assert decoded.options is not None
        assert not isinstance(decoded.options, dict), decoded.title
        assert decoded.field_config is not None
        if config.field_config_from_json_hook is not None:
            assert decoded.field_config.defaults.custom is not None
            assert not isinstance(decoded.field_config.defaults.custom, dict), decoded.title
        decoded_targets = [t for t in decoded.targets or [] if isinstance(t, prometheus_models.Dataquery)]
        assert len(decoded_targets) == len(decoded.targets or []), f"non-Prometheus target in {decoded.title}"
        assert len(decoded_targets) == len(original["targets"]) > 0, decoded.title
        for target, raw in zip(decoded_targets, original["targets"], strict=True):
            assert (target.ref_id, target.expr) == (raw["refId"], raw["expr"])
            n_targets += 1
        assert len({t.ref_id for t in decoded_targets}) == len(decoded_targets), f"duplicate refId in {decoded.title}"
    assert n_targets == len(targets(data))
    assert len({p.id_val for p in panels}) == len(panels), "panel ids must be unique"


def test_variables() -> None:
    variables = {v["name"]: v for v in checked_in()["templating"]["list"]}
    assert set(variables) == {"datasource", "budget"}
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    budget = variables["budget"]
    assert budget["type"] == "query"
    assert budget["query"] == "label_values(budgetflow_budget_spend_usd, budget)"
    assert budget["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert budget["multi"] is True
    assert budget["includeAll"] is True
    assert budget["allValue"] == ".*"


def test_every_query_reads_the_selected_datasource() -> None:
    selected = {"type": "prometheus", "uid": "${datasource}"}
    for panel in all_panels(checked_in()["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == selected, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == selected, panel["title"]


def test_per_budget_series_follow_the_budget_variable() -> None:
    for expr in expressions(checked_in()):
        for name in METRIC_NAME.findall(expr):
            if name.startswith("budgetflow_budget_"):
                assert f'{name}{{budget=~"$budget"}}' in expr, expr


# --------------------------------------------------------------------------- (c) PromQL


def test_promql_parses_with_promtool(promtool: str, tmp_path: Path) -> None:
    data = checked_in()
    sources = [
        (f"{panel['title']} / {target['refId']}", substitute(target["expr"]))
        for panel in all_panels(data["panels"])
        for target in panel.get("targets") or []
    ]
    assert sources
    for where, expr in sources:
        assert "$" not in expr, f"unsubstituted variable in {where}: {expr!r}"
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{n}", "expr": expr} for n, (_, expr) in enumerate(sources)],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    legend = "\n".join(f"  dashboard:q{n} is {where}" for n, (where, _) in enumerate(sources))
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\nrules:\n{legend}"
    assert f"SUCCESS: {len(sources)} rules found" in proc.stdout


# --------------------------------------------------------------------------- (d) metric names


def test_metric_names_are_ones_budgetflow_exports() -> None:
    names = dashboard_metric_names()
    assert names
    # Each name is spelled as exposed (a counter with _total, a histogram with its suffix)...
    assert names <= exposed_series(), sorted(names - exposed_series())
    # ...and belongs to a listed family.
    families = {family(name) for name in names}
    assert families
    assert families <= GAUGES | COUNTERS | HISTOGRAMS, sorted(families - (GAUGES | COUNTERS | HISTOGRAMS))


def test_required_panels_are_there() -> None:
    """The metrics the dashboard exists to show are all queried."""
    families = {family(name) for name in dashboard_metric_names()}
    assert {
        "budgetflow_budget_spend_usd",
        "budgetflow_budget_soft_limit_usd",
        "budgetflow_budget_limit_usd",
        "budgetflow_budget_status",
        "budgetflow_budget_projected_spend_usd",
        "budgetflow_cost_per_request_usd",
        "budgetflow_tokens",
        "budgetflow_router_decisions",
        "budgetflow_dead_letters",
        "budgetflow_late_entries",
        "budgetflow_consumer_lag_records",
        "budgetflow_status_propagation_seconds",
        "budgetflow_heartbeat_age_seconds",
    } <= families
    exprs = expressions(checked_in())
    assert "max by (partition) (budgetflow_heartbeat_age_seconds)" in exprs
    status = next(p for p in all_panels(checked_in()["panels"]) if p["type"] == "state-timeline")
    mapping = status["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {value: (m["text"], m["color"]) for value, m in mapping.items()} == {
        "0": ("normal", "green"),
        "1": ("soft limit", "orange"),
        "2": ("hard limit", "red"),
    }
