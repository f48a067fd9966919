"""The Helm chart: lint --strict, renders with default and full values, validates offline against the Kubernetes
schemas (kubernetes-validate), refuses bad values, and sets only settings budgetflow knows.

Helm is built from the Go module proxy at the version in helm/HELM_VERSION by `make setup`. Without it (or without
promtool) the tests that need it skip, and one test says so, in one line, and fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "budgetflow"
FULL_VALUES = ROOT / "tests" / "helm" / "full-values.yaml"
KUBERNETES = "1.30"  # the oldest Kubernetes the chart is validated against (kubeVersion says >= 1.25)
CRDS = {"ServiceMonitor", "PrometheusRule"}
HELM_VERSION = (ROOT / "helm" / "HELM_VERSION").read_text().strip()
# Where the Makefile builds it (HELM there): the release-like build, whose default Kubernetes is its client-go's.
HELM = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "budgetflow"
    / "tools"
    / f"helm-{HELM_VERSION}-release"
    / "helm"
)


def helm() -> str:
    if not HELM.exists():
        pytest.skip("needs helm (see test_helm_is_built)")
    return str(HELM)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("needs promtool (see tests/unit/test_alerts.py::test_promtool_is_installed)")
    return found


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm(), *args], capture_output=True, text=True, check=False, timeout=120)


def render(*args: str) -> list[dict[str, Any]]:
    proc = run_helm("template", "bf", str(CHART), "--namespace", "budgets", "--kube-version", KUBERNETES, *args)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec") or spec.get("jobTemplate", {}).get("spec", {}).get("template", {})
        for container in (pod or {}).get("containers", []):
            found.append((f"{doc['kind']}/{doc['metadata']['name']}", container))
    return found


def test_helm_is_built() -> None:
    if not HELM.exists():
        pytest.fail(f"helm {HELM_VERSION} is not built: run `make setup` (it builds {HELM})", pytrace=False)


def test_helm_renders_the_chart_for_its_default_kubernetes() -> None:
    """`make chart` renders without --kube-version. A plain `go install` of Helm defaults to Kubernetes v1.20,
    which the chart's kubeVersion refuses; the Makefile's build defaults to its client-go's version."""
    proc = run_helm("template", "bf", str(CHART))
    assert proc.returncode == 0, proc.stderr
    for kube in ("1.25", KUBERNETES):  # the oldest the chart allows, the oldest it is validated against
        proc = run_helm("template", "bf", str(CHART), "--kube-version", kube)
        assert proc.returncode == 0, (kube, proc.stderr)
    proc = run_helm("template", "bf", str(CHART), "--kube-version", "1.24")
    assert proc.returncode != 0
    assert "kubeVersion" in proc.stderr


def test_make_test_runs_make_chart() -> None:
    """CI runs `make test` (.ci/run): it must lint and render the chart the way `make chart` does."""
    proc = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    chart = [line for line in lines if line.endswith(" helm/budgetflow") and " lint --strict" in line]
    assert chart, proc.stdout
    assert any("template budgetflow helm/budgetflow" in line for line in lines), proc.stdout
    pytest_runs = [i for i, line in enumerate(lines) if line.startswith(".venv/bin/pytest")]
    assert pytest_runs
    assert lines.index(chart[0]) < pytest_runs[0], "the chart is checked before the suite runs"


@pytest.mark.parametrize("values", [[], ["-f", str(FULL_VALUES)]], ids=["default", "full"])
def test_lint_strict_passes(values: list[str]) -> None:
    proc = run_helm("lint", "--strict", str(CHART), *values)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values", [[], ["-f", str(FULL_VALUES)]], ids=["default", "full"])
def test_rendered_manifests_validate_against_the_kubernetes_schemas(values: list[str]) -> None:
    docs = render(*values)
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "StatefulSet", "Job", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    for doc in docs:
        if doc["kind"] in CRDS:
            continue  # not in the Kubernetes schemas; checked below
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_full_values_render_every_optional_part() -> None:
    docs = render("-f", str(FULL_VALUES))
    kinds = {doc["kind"] for doc in docs}
    assert {"HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"} <= kinds
    enrich = next(doc for doc in docs if doc["kind"] == "Deployment")
    assert "replicas" not in enrich["spec"], "the HPA owns the replica count"
    env = {e["name"]: e for _, c in containers(docs) for e in c.get("env", [])}
    assert env["BUDGETFLOW_KAFKA__SECURITY__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "kafka-user"
    assert "value" not in env["BUDGETFLOW_KAFKA__SECURITY__SASL_PASSWORD"], "secrets come from Secrets only"
    assert "valueFrom" in env["BUDGETFLOW_WEB__BEARER_TOKEN"]
    assert env["BUDGETFLOW_NOTIFY__WEBHOOK_URL"]["valueFrom"]["secretKeyRef"]["name"] == "budgetflow-webhook"
    notify = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-notify"))
    assert notify["spec"]["template"]["spec"]["containers"][0]["args"] == ["notify"]


def test_the_prometheus_rule_holds_the_checked_alert_rules(tmp_path: Path) -> None:
    rule = next(doc for doc in render("-f", str(FULL_VALUES)) if doc["kind"] == "PrometheusRule")
    shipped = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert rule["spec"] == shipped
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_dashboard_config_map_is_the_shipped_dashboard() -> None:
    cm = next(d for d in render() if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["budgetflow.json"]) == json.loads((CHART / "files" / "dashboard.json").read_text())


@pytest.mark.parametrize("values", [[], ["-f", str(FULL_VALUES)]], ids=["default", "full"])
def test_every_container_gets_settings_budgetflow_accepts(
    values: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from budgetflow.schemas.settings import Settings, setting_rows

    known = {row[0] for row in setting_rows()}
    docs = render(*values)
    mounted = {"/etc/budgetflow/prices/prices.yaml": tmp_path / "prices.yaml"}
    for doc in docs:
        if doc["kind"] == "ConfigMap" and "prices.yaml" in doc["data"]:
            mounted["/etc/budgetflow/prices/prices.yaml"].write_text(doc["data"]["prices.yaml"])
    for name, container in containers(docs):
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        ours = {k: v for k, v in env.items() if k.startswith("BUDGETFLOW_")}
        assert set(ours) <= known, (name, set(ours) - known)
        # Load them as a worker would (secrets stand in; files are not there).
        for key in [k for k in os.environ if k.startswith("BUDGETFLOW_")]:
            monkeypatch.delenv(key)
        for key, value in ours.items():
            text = (
                ("https://hooks.example/from-a-secret" if key.endswith("_URL") else "from-a-secret")
                if value is None
                else value
            )
            if key.startswith("BUDGETFLOW_KAFKA__SECURITY__SSL_") and key.endswith("FILE"):
                text = sys.executable  # any readable file
            text = str(mounted.get(text, text))  # the ConfigMap's file, where the pod would mount it
            monkeypatch.setenv(key, text.replace("$(POD_NAME)", "pod").replace("$(POD_NAMESPACE)", "ns"))
        Settings()


def test_policies_and_prices_config_maps_load_with_budgetflow(tmp_path: Path) -> None:
    from budgetflow.schemas.policy import parse_policy_text
    from budgetflow.tokenizers.pricing import PriceTable

    maps = {d["metadata"]["name"]: d["data"] for d in render("-f", str(FULL_VALUES)) if d["kind"] == "ConfigMap"}
    policies = parse_policy_text(maps["bf-budgetflow-policies"]["policies.yaml"], source="policies.yaml")
    assert [p.id for p in policies.budgets] == ["global", "team:search"]
    prices = tmp_path / "prices.yaml"
    prices.write_text(maps["bf-budgetflow-prices"]["prices.yaml"])
    table = PriceTable.load(prices)
    price = table.price("acme-large", provider="acme")
    assert (price.match, price.input, price.output) == ("acme-large", 2_000_000, 8_000_000)


def test_pods_run_as_non_root_with_a_read_only_root_filesystem() -> None:
    docs = render("-f", str(FULL_VALUES))
    for name, container in containers(docs):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod:
            assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "topics.partitions=0"], "partitions"),
        (["--set", "enrich.replica=2"], "replica"),
        (["--set", "settings.BUDGETFLOW_NOT_A_SETTING=1"], "BUDGETFLOW_NOT_A_SETTING"),
        (["--set", "settings.BUDGETFLOW_TOPICS__PREFIX=x."], "BUDGETFLOW_TOPICS__PREFIX"),
        (["--set", "kafka.securityProtocol=SASL_SSL", "--set", "kafka.saslMechanism=SCRAM-SHA-512"], "saslSecret"),
        (["--set", "kafka.bootstrapServers=nohost"], "bootstrapServers"),
        (["--set", "aggregate.persistence.size=lots"], "size"),
        (["--set", "notify.enabled=true"], "webhookSecret"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(args: list[str], complaint: str) -> None:
    proc = run_helm("template", "bf", str(CHART), "--kube-version", KUBERNETES, *args)
    assert proc.returncode != 0
    assert complaint in proc.stderr, proc.stderr


def test_values_schema_is_generated_from_the_settings() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "helm" / "values_schema.py")], capture_output=True, text=True, check=True
    )
    assert json.loads(proc.stdout) == json.loads((CHART / "values.schema.json").read_text()), (
        "regenerate: .venv/bin/python helm/values_schema.py > helm/budgetflow/values.schema.json"
    )
