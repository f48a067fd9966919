"""Metrics checked by Prometheus itself: promtool on every scrape, a real server's PromQL exact to the cent,
sums that do not double after a rebalance, a dashboard whose metrics all exist, and no secret anywhere."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]
SECRET_PROMPT = "PROMPT-SECRET-4b1d"
API_KEY = "sk-live-SECRET-KEY-93af"
KEY_BUDGET = "key:" + hashlib.sha256(API_KEY.encode()).hexdigest()[:8]


def enrich_metrics_port(log: Path) -> int | None:
    match = re.search(r"enrich metrics on port (\d+)", log.read_text(errors="replace"))
    return int(match.group(1)) if match else None


async def fetch(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as response:
        assert response.status == 200, f"{url}: {response.status}"
        return await response.text()


async def promql(http: aiohttp.ClientSession, base: str, query: str) -> list[dict[str, Any]]:
    async with http.get(f"{base}/api/v1/query", params={"query": query}) as response:
        body = await response.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


async def wait_until(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def promtool_check_metrics(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: `make setup` installs Debian's prometheus package"
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_metrics_prometheus_dashboard_and_privacy(pipeline_factory: Any, kit: Any, tmp_path: Path) -> None:
    from budgetflow.streams.dev.localkafka import free_port
    from budgetflow.streams.ops.readback import read_heartbeats

    pipeline, scenario = await kit.start(pipeline_factory, n=800)
    policies = pipeline.root / "policies.yaml"
    policies.write_text(kit.POLICIES + f'  - {{id: "{KEY_BUDGET}", monthly_limit_usd: "100", owner: "@alice"}}\n')
    assert pipeline.cli("policy", "apply", str(policies)).returncode == 0
    enrich = pipeline.start("enrich")
    pipeline.start("aggregate", data="agg-a")
    second = pipeline.start("aggregate", data="agg-b")
    gateway_port = free_port()
    gateway_log = tmp_path / "gateway.log"
    keys = tmp_path / "keys.yaml"  # the gateway charges API_KEY's requests to team:a
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    keys.write_text(f'keys: [{{name: obs, sha256: "{digest}", budgets: [team:a]}}]\n')
    gateway = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "gateway.py"), "--port", str(gateway_port), "--keys", str(keys)],
        env=dict(pipeline.env_base, BUDGETFLOW_DATA_DIR=str(tmp_path / "gw")),
        stdout=gateway_log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    prometheus_dir = tmp_path / "prometheus"
    prometheus_dir.mkdir()
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        await pipeline.produce(scenario.records)
        await kit.settle(pipeline, scenario)

        async def owners() -> set[str]:
            beats = await read_heartbeats(pipeline.settings(), pipeline.topics.heartbeats.name)
            found = {b.owner for b in beats.values() if b.owner and b.as_of.timestamp() > time.time() - 600}
            return found if len(found) == 2 else set()

        aggregates = sorted(await wait_until(owners, 60, "both aggregate workers"))
        enrich_port = await wait_until(lambda: _async(enrich_metrics_port(enrich.log)), 30, "the enrich metrics port")
        targets = {
            "aggregate": [u.removeprefix("http://") for u in aggregates],
            "enrich": [f"127.0.0.1:{enrich_port}"],
            "gateway": [f"127.0.0.1:{gateway_port}"],
        }
        # Traffic through the example gateway, with prompt text and an API key that must not leak anywhere.
        async with aiohttp.ClientSession() as http:
            await wait_until(lambda: _ok(http, f"http://127.0.0.1:{gateway_port}/healthz"), 60, "the gateway")
            for i in range(5):
                async with http.post(
                    f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {API_KEY}", "X-Budget-Ids": "team:a"},
                    json={
                        "model": "gpt-4o",
                        "messages": [{"role": "user", "content": f"{SECRET_PROMPT} question {i}"}],
                    },
                ) as response:
                    assert response.status in (200, 429)
        unpriced = {
            "v": 1,
            "request_id": "unpriced-1",
            "occurred_at": kit.START.isoformat(),
            "budgets": ["team:a"],
            "model": "mystery-model",
            "provider": "testco",
            "backend": "cloud",
            "prompt": "hello",
        }
        await pipeline.produce(
            [
                (
                    pipeline.topics.requests.name,
                    b"bad",
                    json.dumps(
                        {"v": 1, "request_id": "leak", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
                    ).encode(),
                ),
                (pipeline.topics.requests.name, b"unpriced-1", json.dumps(unpriced).encode()),
            ]
        )

        # promtool check metrics on a scrape of each worker (and of the gateway).
        scrapes: dict[str, str] = {}
        async with aiohttp.ClientSession() as http:
            enrich_url = f"http://{targets['enrich'][0]}/metrics"
            await wait_until(
                lambda: _contains(http, enrich_url, "budgetflow_unpriced_requests_total"),
                60,
                "the unpriced request to be counted",
            )
            for hosts in targets.values():
                for host in hosts:
                    text = await fetch(http, f"http://{host}/metrics")
                    promtool_check_metrics(text)
                    scrapes[host] = text
        assert "budgetflow_budget_spend_usd" in "".join(scrapes[h] for h in targets["aggregate"])
        # The policy's owner rides on the status gauge, for the alerts to carry.
        assert f'budgetflow_budget_status{{budget="{KEY_BUDGET}",owner="@alice"}}' in "".join(scrapes.values())
        assert "budgetflow_cost_per_request_usd_bucket" in scrapes[targets["enrich"][0]]
        assert "budgetflow_router_decisions_total" in scrapes[targets["gateway"][0]]

        # A real Prometheus scraping them all.
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": role, "static_configs": [{"targets": hosts}]} for role, hosts in targets.items()
            ],
        }
        (prometheus_dir / "prometheus.yml").write_text(json.dumps(config))
        prometheus = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={prometheus_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={prometheus_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=(prometheus_dir / "log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        current = max(p for _, p in scenario.settled)
        expected = {b: s for (b, p), s in scenario.settled.items() if p == current}
        async with aiohttp.ClientSession() as http:

            async def spend_matches() -> bool:
                try:
                    rows = await promql(http, base, "sum by (budget) (budgetflow_budget_spend_usd)")
                except aiohttp.ClientError:
                    return False
                got = {r["metric"]["budget"]: float(r["value"][1]) for r in rows}
                return all(abs(got.get(b, -1.0) - s / 1e12) < 0.005 for b, s in expected.items())

            await wait_until(spend_matches, 90, "Prometheus to report each budget's spend to the cent")
            # Every metric the dashboard queries exists in Prometheus, once each target has been scraped.
            missing: set[str] = set()

            # A gauge with no sample by design has no series in Prometheus: the projected hard limit exists only
            # while a budget is projected to reach it this month (after the scenario's traffic stops, the burn rate
            # decays at 3600 simulated seconds a second, faster on a busy machine). Its target declares it still.
            declared = {
                line.split()[2] for text in scrapes.values() for line in text.splitlines() if line.startswith("# TYPE ")
            }
            sometimes_empty = {"budgetflow_budget_projected_hard_limit_seconds"} & declared

            async def dashboard_complete() -> bool:
                names = set((await _json(http, f"{base}/api/v1/label/__name__/values"))["data"])
                missing.clear()
                missing.update(dashboard_metrics() - names - sometimes_empty)
                return not missing

            try:
                await wait_until(dashboard_complete, 60, "every metric the dashboard queries")
            except AssertionError:
                raise AssertionError(f"the dashboard queries metrics no target exports: {sorted(missing)}") from None
            # Kill one aggregate: its partitions move, and sum() over a budget neither doubles nor drops.
            second.kill()

            async def one_aggregate_down() -> bool:
                rows = await promql(http, base, 'up{job="aggregate"} == 0')
                return len(rows) == 1

            # Once Prometheus has seen the target down, the killed worker's series are stale; once the survivor
            # holds every partition, the sums hold again, from one owner each.
            await wait_until(one_aggregate_down, 60, "Prometheus to see the killed aggregate down")
            partitions = pipeline.topics.ledger.partitions

            async def survivor_holds_all() -> bool:
                for url in aggregates:
                    try:
                        health = await _json(http, f"{url}/healthz")
                    except aiohttp.ClientError:
                        continue  # the killed one
                    if health.get("ready") and health.get("partitions") == list(range(partitions)):
                        return True
                return False

            await wait_until(survivor_holds_all, 120, "the surviving aggregate to hold every ledger partition")
            await wait_until(spend_matches, 120, "the sums to hold after the rebalance")
            rows = await promql(http, base, 'count by (budget) (budgetflow_budget_spend_usd{budget="global"})')
            assert [r["value"][1] for r in rows] == ["1"], "one series per budget, from its one owner"

        # No prompt text, message content or API key in metrics, logs, the DLQ or the stats API.
        stats = []
        async with aiohttp.ClientSession() as http:
            alive = [url for url in aggregates if await _ok(http, f"{url}/healthz")]
            assert len(alive) == 1, "one of the two workers was killed"
            stats.append(await fetch(http, f"{alive[0]}/v1/budgets"))
            stats.append(await fetch(http, f"{alive[0]}/v1/budgets/{KEY_BUDGET}"))
        dead = await pipeline.dead_letters()
        assert dead, "the malformed request reached the DLQ"
        haystacks = {
            "metrics": "".join(scrapes.values()),
            "logs": "".join(w.log.read_text(errors="replace") for w in pipeline.workers) + gateway_log.read_text(),
            "dlq": "".join(str(h) + str(v) for h, _, v in dead),
            "stats API": "".join(stats),
        }
        for where, text in haystacks.items():
            for secret in (SECRET_PROMPT, API_KEY):
                assert secret not in text, f"{secret!r} leaked into the {where}"
        assert KEY_BUDGET in haystacks["stats API"]  # the key's budget id is there; the key is not
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        gateway.terminate()
        gateway.wait(timeout=30)


def dashboard_metrics() -> set[str]:
    """Metric names the dashboard's queries use, as Prometheus names them."""
    text = (ROOT / "helm" / "budgetflow" / "files" / "dashboard.json").read_text()
    return set(re.findall(r"budgetflow_[a-z_]+", text))


async def _async(value: Any) -> Any:
    return value


async def _contains(http: aiohttp.ClientSession, url: str, text: str) -> bool:
    async with http.get(url) as response:
        return text in await response.text()


async def _ok(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def _json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        return await response.json()
