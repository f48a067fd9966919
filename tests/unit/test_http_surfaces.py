"""The HTTP surfaces without a broker: `view serve` and the stats API on real sockets, their views fed directly.

Bad input is a 4xx, never a 500; credentials are compared as bytes; an admission takes only JSON, within bounds,
addressed to the machine itself unless a token guards it; a stats request is forwarded only to a configured peer,
with the peer token, never the caller's; the stats API reports budgets as they were last published, not as a
router would treat them without news; and everything listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import os
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from budgetflow.schemas.errors import ConfigError
from budgetflow.schemas.events import BudgetStatus, Heartbeat
from budgetflow.schemas.settings import Settings, load_settings
from budgetflow.streams.aggregate.stats import stats_app
from budgetflow.streams.gateway.view import BudgetView
from budgetflow.streams.gateway.viewserver import view_app
from budgetflow.streams.kafka.topics import Topics, partition_for
from budgetflow.streams.service.http import peer_origin
from budgetflow.streams.service.metrics import PipelineMetrics

TOKEN = "stats-token-\u00e9t\u00e9"  # not ASCII: compared as UTF-8 bytes
PEER_TOKEN = "peer-token-8c1f"
API_TOKEN = "stats-token-7d2a"
LIMIT = 100 * 10**12
ROOT = Path(__file__).resolve().parents[2]
Serve = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Run an app on 127.0.0.1 (a free port); its base URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def raw(base: str, request: bytes) -> tuple[int, bytes]:
    """Send raw HTTP/1.1 bytes (clients refuse non-ASCII headers) and read the status line and body."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def status(budget: str, spend: int, state: str, *, as_of: datetime, partition: int) -> BudgetStatus:
    return BudgetStatus(
        budget_id=budget,
        period=f"{as_of:%Y-%m}",
        status=state,
        spend_usd=spend,
        settled_usd=spend,  # type: ignore[arg-type]
        reserved_usd=0,
        limit_usd=LIMIT,
        remaining_usd=max(LIMIT - spend, 0),
        utilization_percent=spend * 100 / LIMIT,
        soft_limit_percent=75,
        hard_limit_action="block_cloud",
        as_of=as_of,
        next_reset=datetime(2100, 1, 1, tzinfo=UTC),
        reason="threshold",
        partition=partition,
        seq=10,
    )


def beat(partition: int, as_of: datetime, owner: str | None = None) -> Heartbeat:
    return Heartbeat(partition=partition, as_of=as_of, stream_time=as_of, lag_s=0.0, owner=owner)


# -- budgetflow view serve -------------------------------------------------------------------------------------------
async def test_view_serve_answers_400_to_a_body_that_is_not_json(serve: Serve) -> None:
    base = await serve(view_app(BudgetView(Settings())))
    async with aiohttp.ClientSession() as http:
        for path in ("/v1/decide", "/v1/admit"):
            for body in (b"{not json", b"", b"\xff\xfe", b"[1, 2"):
                async with http.post(base + path, data=body, headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 400, (path, body, await r.text())
                    assert "not valid JSON" in await r.text()
            async with http.post(base + path, json=[1, 2]) as r:
                assert r.status == 400, "JSON of the wrong shape is a 400 too"


async def test_view_serve_admits_only_json_and_bounded_amounts(serve: Serve) -> None:
    view = BudgetView(Settings())
    base = await serve(view_app(view))
    admit = base + "/v1/admit"
    body = b'{"budgets": ["team:a"], "estimated_cost_usd": "0.50"}'
    async with aiohttp.ClientSession() as http:
        # What a web page may send across origins without asking the server first.
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            async with http.post(admit, data=body, headers={"Content-Type": content_type}) as r:
                assert r.status == 415, content_type
        async with http.post(admit, data=body) as r:  # no content type at all
            assert r.status == 415
        for amount in ("1000.000001", "1000000000", "-1"):
            async with http.post(admit, json={"budgets": ["team:a"], "estimated_cost_usd": amount}) as r:
                assert r.status == 400, amount
        assert view.status("team:a").spend_pico == 0, "nothing refused was admitted"
        async with http.post(admit, data=body, headers={"Content-Type": "application/json; charset=utf-8"}) as r:
            assert r.status == 204
        async with http.post(admit, json={"budgets": ["team:a"], "estimated_cost_usd": "1000"}) as r:
            assert r.status == 204, "the bound itself is allowed"
    assert view.status("team:a").spend_pico == 1000_500_000_000_000
    decide = {
        "request_id": "r",
        "budgets": ["team:a"],
        "candidates": [{"name": "m", "backend": "cloud"}],
        "estimated_cost_usd": "5000",
    }
    async with aiohttp.ClientSession() as http, http.post(base + "/v1/decide", json=decide) as r:
        assert r.status == 400


async def test_view_serve_without_a_token_answers_only_requests_addressed_to_this_machine(serve: Serve) -> None:
    view = BudgetView(Settings())
    base = await serve(view_app(view))
    port = base.rsplit(":", 1)[1]
    body = b'{"budgets": ["team:a"], "estimated_cost_usd": "1.00"}'
    # A page at attacker.example whose name now resolves to 127.0.0.1 is same-origin and may post JSON.
    for host in (f"attacker.example:{port}", "attacker.example", "127.0.0.1.nip.io"):
        request = (
            f"POST /v1/admit HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        code, _ = await raw(base, request)
        assert code == 403, host
    assert view.status("team:a").spend_pico == 0
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]"):
        request = (
            f"POST /v1/admit HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        code, _ = await raw(base, request)
        assert code == 204, host
    # With a token, the token decides, whatever the name.
    guarded = await serve(view_app(view, "t0ken"))
    request = (
        b"GET /v1/status/team:a HTTP/1.1\r\nHost: budgets.internal\r\nAuthorization: Bearer t0ken\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert (await raw(guarded, request))[0] == 200


async def test_a_non_ascii_authorization_header_is_refused_not_a_crash(serve: Serve) -> None:
    view = BudgetView(Settings())
    bases = [
        await serve(view_app(view, TOKEN)),
        await serve(
            stats_app(
                _worker(Settings(web={"bearer_token": TOKEN})),  # type: ignore[arg-type]
                view,
            )
        ),
    ]
    for base in bases:
        path = "/v1/status/team:a" if base == bases[0] else "/v1/budgets"
        for credential in (
            "Bearer caf\u00e9".encode(),
            b"Bearer \xff\xfe",
            "Bearer stats-token-\u00e9t\u00e9x".encode(),
            b"Bearer stats-token-\xe9t\xe9",
        ):
            code, body = await raw(
                base,
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
                + b"Authorization: "
                + credential
                + b"\r\nConnection: close\r\n\r\n",
            )
            assert code == 401, (base, credential, body)
        code, body = await raw(
            base,
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
            + b"Authorization: "
            + f"Bearer {TOKEN}".encode()
            + b"\r\nConnection: close\r\n\r\n",
        )
        assert code == 200, body


# -- the stats API -----------------------------------------------------------------------------------------------------
def _worker(settings: Settings) -> Any:
    """As much of an AggregateWorker as the stats API needs for budgets it does not hold."""
    return types.SimpleNamespace(
        settings=settings,
        topics=Topics.from_settings(settings),
        ledgers={},
        ready=True,
        catching_up=[],
        metrics=PipelineMetrics(),
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://agg-0.agg-headless.ns.svc:8085", "http://agg-0.agg-headless.ns.svc:8085"),
        ("http://AGG-1.agg-headless.ns.svc:8085/", "http://agg-1.agg-headless.ns.svc:8085"),
        ("http://10.0.0.7:8085", "http://10.0.0.7:8085"),
        ("http://evil.example:8085", None),
        ("http://agg-0.agg-headless.ns.svc:9999", None),  # another port
        ("https://agg-0.agg-headless.ns.svc:8085", None),  # another scheme
        ("http://a.b.agg-headless.ns.svc:8085", None),  # * is one label
        ("http://agg-headless.ns.svc:8085", None),
        ("http://evil.example/.agg-headless.ns.svc:8085", None),
        ("http://x@agg-0.agg-headless.ns.svc:8085", None),
        ("http://agg-0.agg-headless.ns.svc:8085/v1/budgets", None),
        ("http://agg-0.agg-headless.ns.svc:8085?x=1", None),
        ("http://agg-0.agg-headless.ns.svc.evil.example:8085", None),
        ("not a url", None),
        ("", None),
    ],
)
def test_peer_origin(url: str, expected: str | None) -> None:
    peers = ["http://*.agg-headless.ns.svc:8085", "http://10.0.0.7:8085"]
    assert peer_origin(url, peers) == expected


async def test_stats_api_forwards_only_to_configured_peers_with_the_peer_token(serve: Serve) -> None:
    seen: dict[str, list[dict[str, str]]] = {"attacker": [], "peer": []}

    def recorder(name: str) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            seen[name].append(dict(request.headers))
            return web.json_response({"budget_id": request.match_info["budget_id"], "from": name})

        app = web.Application()
        app.router.add_get("/v1/budgets/{budget_id}", answer)
        return app

    attacker, peer = await serve(recorder("attacker")), await serve(recorder("peer"))
    settings = Settings(web={"bearer_token": API_TOKEN, "peer_token": PEER_TOKEN, "peers": [peer]})  # type: ignore[arg-type]
    worker = _worker(settings)
    view = BudgetView(settings)
    base = await serve(stats_app(worker, view))
    partition = partition_for("team:x", worker.topics.ledger.partitions)
    now = datetime.now(UTC)
    caller = {"Authorization": f"Bearer {API_TOKEN}"}
    async with aiohttp.ClientSession() as http:
        # Whoever can write the heartbeats topic names the owner: not a configured peer, not asked.
        view.apply_heartbeat(beat(partition, now, owner=attacker))
        async with http.get(f"{base}/v1/budgets/team:x", headers=caller) as r:
            assert r.status == 503
            assert "not a configured peer" in (await r.json())["error"]
        assert seen["attacker"] == []
        # A configured peer is asked, with the peer token; the caller's token stays here.
        view.apply_heartbeat(beat(partition, now, owner=peer))
        async with http.get(f"{base}/v1/budgets/team:x", headers=caller) as r:
            assert r.status == 200
            assert await r.json() == {"budget_id": "team:x", "from": "peer"}
        (headers,) = seen["peer"]
        assert headers["Authorization"] == f"Bearer {PEER_TOKEN}"
        assert headers["X-Budgetflow-Forwarded"] == "1"
        assert not any("stats-token" in v for h in seen.values() for r in h for v in r.values())
        # The peer token opens forwarded budget requests only, and a forwarded request is never forwarded again.
        as_peer = {"Authorization": f"Bearer {PEER_TOKEN}"}
        for path, headers in (
            ("/v1/budgets", as_peer),
            ("/v1/budgets/team:x", as_peer),
            ("/v1/budgets", {**as_peer, "X-Budgetflow-Forwarded": "1"}),
        ):
            async with http.get(base + path, headers=headers) as r:
                assert r.status == 401, (path, headers)
        async with http.get(f"{base}/v1/budgets/team:x", headers={**as_peer, "X-Budgetflow-Forwarded": "1"}) as r:
            assert r.status == 503, "held elsewhere: answered, not forwarded again"
        assert len(seen["peer"]) == 1


async def test_stats_api_lists_budgets_as_last_published_not_as_routed_without_news(serve: Serve) -> None:
    """Past VIEW__EXPIRE_AFTER_S a router treats a budget by VIEW__STALE_MODE; the stats API reports what it was."""
    settings = Settings()
    view = BudgetView(settings)
    base = await serve(stats_app(_worker(settings), view))
    now = datetime.now(UTC)
    old = now - timedelta(seconds=settings.view.expire_after_s + 60)
    partition = partition_for("team:a", 8)
    view.apply_status(status("team:a", 80 * 10**12, "soft_limit", as_of=old, partition=partition))
    view.apply_heartbeat(beat(partition, old))
    assert view.status("team:a").utilization is None, "the router's open mode: the setup is what the test needs"
    async with aiohttp.ClientSession() as http, http.get(f"{base}/v1/budgets") as r:
        (row,) = (await r.json())["budgets"]
    assert (row["status"], row["utilization_percent"], row["spend_usd"], row["stale"]) == (
        "soft_limit",
        80.0,
        "80.000000000000",
        True,
    )
    view.apply_heartbeat(beat(partition, now))
    async with aiohttp.ClientSession() as http, http.get(f"{base}/v1/budgets") as r:
        (fresh,) = (await r.json())["budgets"]
    assert fresh == {**row, "stale": False}, "with news or without, the same status"


# -- settings and defaults -----------------------------------------------------------------------------------------------
def test_http_surfaces_listen_on_localhost_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("BUDGETFLOW_")]:
        monkeypatch.delenv(key)
    assert load_settings().web.host == "127.0.0.1"
    assert load_settings().web.peers == []


def test_peers_are_origins_and_need_a_peer_token_beside_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("BUDGETFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("BUDGETFLOW_WEB__PEERS", '["http://*.agg.ns.svc:8085", "http://[::1]:1", "https://a"]')
    assert load_settings().web.peers == ["http://*.agg.ns.svc:8085", "http://[::1]:1", "https://a"]
    for bad in ('["http://a:1/path"]', '["ftp://a"]', '["http://u@a:1"]', '["http://a.*.b:1"]', '["*"]'):
        monkeypatch.setenv("BUDGETFLOW_WEB__PEERS", bad)
        with pytest.raises(ConfigError, match="BUDGETFLOW_WEB__PEERS"):
            load_settings()
    monkeypatch.setenv("BUDGETFLOW_WEB__PEERS", '["http://a:1"]')
    monkeypatch.setenv("BUDGETFLOW_WEB__BEARER_TOKEN", "t")
    with pytest.raises(ConfigError, match="PEER_TOKEN is required"):
        load_settings()
    monkeypatch.setenv("BUDGETFLOW_WEB__PEER_TOKEN", "p")
    assert load_settings().web.peer_token is not None


def test_the_chart_listens_on_all_interfaces_and_forwards_only_within_its_stateful_set() -> None:
    import subprocess

    version = (ROOT / "helm" / "HELM_VERSION").read_text().strip()
    helm = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "budgetflow" / "tools"
    helm = helm / f"helm-{version}" / "helm"
    if not helm.exists():
        pytest.fail(f"helm {version} is not built: run `make setup`", pytrace=False)
    chart = ROOT / "helm" / "budgetflow"
    template = [str(helm), "template", "bf", str(chart), "--namespace", "budgets", "--kube-version", "1.30"]
    proc = subprocess.run(template, capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] in ("Deployment", "StatefulSet")]
    env = {
        d["metadata"]["name"]: {
            e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        for d in docs
    }
    assert env["bf-budgetflow-enrich"]["BUDGETFLOW_WEB__HOST"] == "0.0.0.0"
    aggregate = env["bf-budgetflow-aggregate"]
    assert aggregate["BUDGETFLOW_WEB__HOST"] == "0.0.0.0"

    def pod(value: str, name: str) -> str:
        return value.replace("$(POD_NAME)", name).replace("$(POD_NAMESPACE)", "budgets")

    peers = yaml.safe_load(pod(aggregate["BUDGETFLOW_WEB__PEERS"], ""))
    other = pod(aggregate["BUDGETFLOW_WEB__ADVERTISED_URL"], "bf-budgetflow-aggregate-1")
    assert peer_origin(other, peers) == other
    assert peer_origin(other.replace(".budgets.svc", ".elsewhere.svc"), peers) is None
    # A stats token needs the workers' own token beside it.
    proc = subprocess.run(
        [*template, "--set", "aggregate.bearerTokenSecret.name=s"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "peerTokenSecret" in proc.stderr


async def test_view_serve_flags_the_cloud_fallback_of_a_shifted_request(serve: Serve) -> None:
    view = BudgetView(Settings())
    now = datetime.now(UTC)
    view.apply_status(status("team:a", LIMIT * 99 // 100, "soft_limit", as_of=now, partition=0))
    view.apply_heartbeat(beat(0, now))
    base = await serve(view_app(view))
    candidates = [{"name": "gpt-4o", "backend": "cloud", "score": 1}, {"name": "llama", "backend": "local"}]
    answers = []
    async with aiohttp.ClientSession() as http:
        for i in range(20):
            body = {"request_id": f"r-{i}", "budgets": ["team:a"], "candidates": candidates}
            async with http.post(base + "/v1/decide", json=body) as r:
                assert r.status == 200
                answers.append(await r.json())
    shifted = [a for a in answers if not a["cloud_allowed"]]
    assert shifted, "at 99 % of a soft limit of 75, most requests are shifted"
    for answer in shifted:
        assert [(c["name"], c["fallback"]) for c in answer["candidates"]] == [("llama", False), ("gpt-4o", True)]
