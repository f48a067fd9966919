"""The readable form of `budgetflow bench`'s results: one markdown block per section, in a fixed order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["render"]


def _row(name: str, p: dict[str, float]) -> str:
    return f"| {name} | {p['p50_us']:.1f} | {p['p95_us']:.1f} | {p['p99_us']:.1f} |"


def _tokenizers(section: dict[str, Any]) -> list[str]:
    lines = [
        "| prompt | tokens/req | budgetflow tok/s | tiktoken tok/s | budgetflow p50/p95/p99 µs | "
        "tiktoken p50/p95/p99 µs | overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, row in section.items():
        if size == "elapsed_s":
            continue
        ours, raw = row["budgetflow"], row["tiktoken"]
        lines.append(
            f"| {size} | {row['tokens_per_request']:.0f} | {ours['tokens_per_s']:,.0f} "
            f"| {raw['tokens_per_s']:,.0f} "
            f"| {ours['p50_us']:.0f}/{ours['p95_us']:.0f}/{ours['p99_us']:.0f} "
            f"| {raw['p50_us']:.0f}/{raw['p95_us']:.0f}/{raw['p99_us']:.0f} | {row['overhead_percent']:+.1f} % |"
        )
    return [*lines, ""]


def _heuristic_error(section: dict[str, Any]) -> list[str]:
    lines = [
        f"heuristic vs exact, {section['texts_per_kind']} texts per kind (error %, + = overestimate)",
        "",
        "| text / encoding | mean | p5 | p50 | p95 | min | max | underestimates |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in section.items():
        if not isinstance(e, dict):
            continue
        lines.append(
            f"| {name} | {e['mean_percent']:+.1f} | {e['p5_percent']:+.1f} | {e['p50_percent']:+.1f} "
            f"| {e['p95_percent']:+.1f} | {e['min_percent']:+.1f} | {e['max_percent']:+.1f} "
            f"| {e['underestimates_percent']:.1f} % |"
        )
    return lines


def _enrich(row: dict[str, Any]) -> list[str]:
    return [
        "",
        f"enrich, {row['requests']:,} chat requests (mean {row['mean_bytes']:,.0f} B), one worker: "
        f"{row['enrich_per_s']:,.0f} requests/s; raw tiktoken on the same texts in one process: "
        f"{row['raw_tiktoken_per_s']:,.0f}/s; ratio {row['ratio']:.2f}",
    ]


def _aggregate(section: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"aggregate, {section['entries']:,} ledger entries, one worker",
        "",
        "| budgets | aggregate entries/s | raw consumer entries/s | ratio |",
        "|---|---|---|---|",
    ]
    for label in ("1000_budgets", "one_budget"):
        row = section[label]
        name = label.replace("_", " ")
        lines.append(
            f"| {name} | {row['aggregate_per_s']:,.0f} | {row['raw_consumer_per_s']:,.0f} | {row['ratio']:.2f} |"
        )
    return lines


def _shards(section: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"one hot budget, {section['entries']:,} ledger entries, {section['shards']} shards, {section['cpus']} CPUs "
        "shared with the broker",
        "",
        "| cell | entries/s | ratio | worker CPU % | ledger partitions | status latency p50/p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for label in ("unsharded_1_worker", "sharded_1_worker", "sharded_2_workers"):
        row = section[label]
        cpu = " + ".join(f"{c:.0f}" for c in row["worker_cpu_percent"])
        latency = row["status_latency_ms"]
        lines.append(
            f"| {label.replace('_', ' ')} | {row['entries_per_s']:,.0f} | {row['ratio']:.2f} | {cpu} "
            f"| {len(row['partitions'])} | {latency['p50_ms']:.0f}/{latency['p99_ms']:.0f} |"
        )
    return lines


def _latency(row: dict[str, Any]) -> list[str]:
    return [
        "",
        f"threshold crossing to status on the topic, idle, {row['trials']} trials: "
        f"p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
        f"max {row['max_ms']:.0f} ms",
    ]


def _load(row: dict[str, Any]) -> list[str]:
    q = row["latency"]
    lines = [
        "",
        f"under {row['achieved_per_s']:,.0f} usage events/s: threshold crossing to status on the topic "
        f"p50 {q['p50_ms']:.0f} ms, p95 {q['p95_ms']:.0f} ms, p99 {q['p99_ms']:.0f} ms ({row['trials']} "
        "trials)",
    ]
    over = row["overshoot"]
    for mode in ("bounded", "admitted"):
        o = over[mode]
        lines.append(
            f"overshoot at {row['rate_per_s']:,.0f} requests/s on a $1 cap, "
            f"{'with' if mode == 'admitted' else 'without'} view.admit: ${o['overshoot_usd']:.4f} "
            f"({o['overshoot_requests']:.1f} requests of ${over['request_cost_usd']:.4f})"
        )
    return lines


def _recovery(row: dict[str, Any]) -> list[str]:
    return [
        "",
        f"aggregate with {row['budgets']:,} budgets, stop to ready: {row['ready_rocksdb_s']:.1f} s "
        f"on its RocksDB store, {row['ready_from_changelog_s']:.1f} s from the changelog "
        f"({row['changelog_records']:,} records), {row['ready_empty_state_s']:.1f} s with no state; "
        f"RSS {row['rss_loaded_bytes'] / 2**20:.0f} MiB ({row['rss_bytes_per_budget']:.0f} B per budget), "
        f"store {row['store_bytes_per_budget']:.0f} B per budget",
    ]


def _routing(row: dict[str, Any]) -> list[str]:
    mib = row["view_traced_bytes"] / 2**20
    return [
        "",
        f"BudgetView with {row['budgets']:,} budgets: {mib:.1f} MiB allocated "
        f"({row['bytes_per_budget']:.0f} B per budget), RSS +{row['view_rss_bytes'] / 2**20:.1f} MiB",
        "",
        "| call | p50 µs | p95 µs | p99 µs |",
        "|---|---|---|---|",
        _row("view.decide (2 budgets + global)", row["decide"]),
        _row("baseline: 3 dict lookups + SHA-256", row["baseline"]),
        *(
            [
                _row("view.decide + view.lease, covering leases (2 block_cloud budgets)", row["decide_lease"]),
                _row("baseline: the view.decide of those calls alone", row["decide_with_policies"]),
            ]
            if "decide_lease" in row
            else []
        ),
    ]


def _publisher(row: dict[str, Any]) -> list[str]:
    return [
        "",
        f"publisher, {row['calls']:,} calls, caller's side",
        "",
        "| call | p50 µs | p95 µs | p99 µs |",
        "|---|---|---|---|",
        _row("publish_request (validate, serialize, buffer)", row["publish_request"]),
        _row("baseline: asyncio.Queue.put", row["baseline"]),
    ]


def _count(value: int | None) -> str:
    return "none refused" if value is None else f"{value:,}"


def _litellm(section: dict[str, Any]) -> list[str]:
    if "skipped" in section:
        return ["", f"litellm: skipped ({section['skipped']})"]
    lines = [
        "",
        f"LiteLLM {section['litellm_version']} proxy, mocked models: a ${section['limit_usd']} budget, "
        f"${section['per_request_usd']} per request, {section['requests']:,} requests "
        f"(exact: {section['exact']:,} admitted)",
        "",
        "| system | budget | proxy workers | concurrency | admitted | admitted / exact | spend "
        "| admitted before the first refusal | requests/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["overshoot"]:
        source = "ledger" if r["system"] == "budgetflow" else "LiteLLM's cost"
        lines.append(
            f"| {r['system']} | {r['budget']} | {r['workers']} | {r['concurrency']} | {r['admitted']:,} "
            f"| {r['ratio']:.2f} | ${r['spend_usd']} ({source}) | {_count(r['admitted_before_first_refusal'])} "
            f"| {r['requests_per_s']:.0f} |"
        )
    q = section["latency"]
    with_cb, without = q["with_callback"], q["without_callback"]
    return [
        *lines,
        "",
        f"through the proxy, concurrency 1, {q['requests']:,} requests each (interleaved, after {q['warm_up']}): "
        f"with budgetflow's callback p50 {with_cb['p50_ms']:.1f} ms, p99 {with_cb['p99_ms']:.1f} ms; "
        f"without p50 {without['p50_ms']:.1f} ms, p99 {without['p99_ms']:.1f} ms; "
        f"added p50 {q['added_p50_ms']:+.1f} ms, p99 {q['added_p99_ms']:+.1f} ms",
    ]


def _answers(row: dict[str, Any], status: str, keys: tuple[str, ...]) -> str:
    """How long the answers of one status took, in ms ("–" when there were none)."""
    times = row.get("answer_ms", {}).get(status)
    return " / ".join(f"{times[k + '_ms']:.1f}" for k in keys) if times else "–"


def _caps(section: dict[str, Any]) -> list[str]:
    if "skipped" in section:
        return ["", f"caps: skipped ({section['skipped']})"]
    lines = [
        "",
        f"the example gateway at a hard cap: a ${section['limit_usd']} {section['hard_limit_action']} budget, "
        f"${section['per_request_usd']} per request, {section['requests']:,} requests round-robin over the gateways "
        f"(exact: {section['exact']:,} admitted)",
        "",
        "| leases | gateways | concurrency | admitted | admitted / exact | settled (ledger) | ledger exact "
        "| admitted before the first 429 | requests/s | 200 p50 / p99 ms | 429 p50 / p99 / max ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["cells"]:
        lines.append(
            f"| {'yes' if r.get('leases') else 'no'} | {r['gateways']} | {r['concurrency']} | {r['admitted']:,} "
            f"| {r['ratio']:.2f} | ${r['spend_usd']} "
            f"| {'yes' if r['ledger_exact'] else 'no'} | {_count(r['admitted_before_first_429'])} "
            f"| {r['requests_per_s']:.0f} | {_answers(r, '200', ('p50', 'p99'))} "
            f"| {_answers(r, '429', ('p50', 'p99', 'max'))} |"
        )
    return lines


def _cluster(section: dict[str, Any]) -> list[str]:
    def pair(summary: dict[str, Any], key: str) -> str:
        values = summary.get(key)
        return f"{values['p50']:.2f} / {values['max']:.2f}" if values else "–"

    base, kill = section["baseline"], section["kill"]
    return [
        "",
        f"stale statuses at a leader election: {section['nodes']} nodes, replication factor "
        f"{section['replication_factor']}, min.insync.replicas {section['min_insync_replicas']}; "
        f"{section['requests_per_s']} requests/s over {section['budgets']} budgets, statuses refreshed every "
        f"{section['status_refresh_s']:g} s; a router's BudgetView ({section['requests']:,} requests, ledger exact: "
        f"{'yes' if section['ledger_exact'] else 'no'})",
        "",
        "| | trials | longest gap between statuses, p50 / max s | oldest newest status, p50 / max s "
        "| new leader seen after, p50 / max s |",
        "|---|---|---|---|---|",
        f"| no fault | {base['trials']} | {pair(base, 'gap_s')} | {pair(base, 'max_age_s')} | – |",
        f"| status partition's leader SIGKILLed | {kill['trials']} | {pair(kill, 'gap_s')} "
        f"| {pair(kill, 'max_age_s')} | {pair(kill, 'new_leader_s')} |",
    ]


def _cell(text: str) -> str:
    """Free text (a stall, an error) made safe for a table cell."""
    return text.replace("|", "/").replace("\n", " ")


def _faust_row(name: str, row: dict[str, Any]) -> str:
    exact = "yes" if row["exact"] else "no"
    if row["per_s"] is None:
        return f"| {name} | – | {_cell(row['failed'])} | {exact} |"
    return f"| {name} | {row['per_s']:,.0f} | {row['ratio']:.3f} | {exact} |"


def _faust(section: dict[str, Any]) -> list[str]:
    if "skipped" in section:
        return ["", f"faust: skipped ({section['skipped']})"]
    t = section["throughput"]
    lines = [
        "",
        f"{section['faust']} beside the aggregate: one topic of {t['entries']:,} ledger entries over "
        f"{t['budgets']:,} budgets, read from its start by each in turn, one worker each",
        "",
        "| reader | entries/s | ratio to the raw consumer | final sums exact |",
        "|---|---|---|---|",
        f"| raw consumer (aiokafka getmany, nothing else) | {t['raw_consumer_per_s']:,.0f} | 1.000 | – |",
        _faust_row("budgetflow aggregate", t["aggregate"]),
        _faust_row("Faust agent, event by event, a write to each of its two tables per entry", t["faust"]),
        _faust_row(f"Faust agent, the same in stream.take({t['faust_take']['take']:,}) batches", t["faust_take"]),
    ]
    k = section["kill9"]
    lines += [
        "",
        f"kill -9 of the worker process twice while {k['entries']:,} entries over {k['budgets']} budgets arrive "
        f"(about {k['feed_per_s']:,.0f}/s), restarted each time; final sums beside the exact ones",
        "",
        "| system | exact | wrong budgets | settles lost | of which the dedupe table holds | settles doubled "
        "| settled error $ | reserved left $ | committed at the kills | committed after the last stop | stalls |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("budgetflow", "faust"):
        r = k[name]
        settled, reserved = r["settled_error_pico"] / 10**12, r["reserved_left_pico"] / 10**12
        end = " of ".join(f"{c:,}" for c in r["committed_at_end"]) or "–"
        lines.append(
            f"| {name} | {'yes' if r['exact'] else 'no'} | {r['wrong_budgets']} | {r['settles_lost']} "
            f"| {r.get('settles_lost_for_good', '–')} | {r['settles_doubled']} | {settled:.6f} | {reserved:.6f} "
            f"| {', '.join(f'{c:,}' for c in r['killed_at_committed'])} | {end} "
            f"| {_cell('; '.join(r['stalls'])) or 'none'} |"
        )
    return lines


# The order of the blocks in the report (not the order the sections ran in).
_BLOCKS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "tokenizers": _tokenizers,
    "heuristic_error": _heuristic_error,
    "enrich": _enrich,
    "aggregate": _aggregate,
    "shards": _shards,
    "latency": _latency,
    "load": _load,
    "recovery": _recovery,
    "routing": _routing,
    "publisher": _publisher,
    "litellm": _litellm,
    "caps": _caps,
    "cluster": _cluster,
    "faust": _faust,
}


def render(results: dict[str, Any]) -> str:
    """A readable table of the results (markdown)."""
    lines = [f"budgetflow bench, {results['date']}{' (quick)' if results['quick'] else ''}", ""]
    sections = results["sections"]
    for name, block in _BLOCKS.items():
        if name in sections:
            lines += block(sections[name])
    return "\n".join(lines)
