"""What `budgetflow demo` shows: the live table of the budgets, and the summary at the end (rich)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from budgetflow.schemas.money import format_usd, parse_usd
from budgetflow.streams.dev.demo_plan import BUDGETS, local_outage

if TYPE_CHECKING:
    from budgetflow.streams.dev.demo_pipeline import Demo

__all__ = ["live_table", "print_summary"]


def _bar(spend: int, limit: int | None, soft: int, width: int = 28) -> str:
    if not limit:
        return "unlimited".ljust(width)
    filled = min(width, int(spend * width / limit))
    mark = min(width - 1, int(soft * width / 100))
    cells = ["█" if i < filled else "·" for i in range(width)]
    cells[mark] = "│" if mark >= filled else "┃"
    return "".join(cells)


def live_table(demo: Demo, view: Any) -> Any:
    """Each budget's spend against its limit, its status as the router sees it, and where its requests went."""
    from rich.table import Table

    now = demo.sim_now()
    table = Table(
        title=f"budgetflow demo · {now:%Y-%m-%d %H:%M} UTC (simulated, {demo.speed:,.0f}× real time)",
        title_justify="left",
        expand=False,
    )
    down_from, down_until = local_outage(demo.start)
    if down_from <= now < down_until:
        table.caption = "[red]the local model is down[/]: shifted requests fall back to cloud where it is not blocked"
    numbers = ("spend", "limit", "cloud", "local", "fallbacks", "rejected")
    for column in ("budget", "spend vs limit (│ soft)", "spend", "limit", "status", "cloud", "local", *numbers[4:]):
        table.add_column(column, justify="right" if column in numbers else "left")
    for budget in BUDGETS:
        state = view.status(budget)
        tally = demo.tallies[budget]
        colour = {"normal": "green", "soft_limit": "yellow", "hard_limit": "red"}[state.status]
        served = tally.cloud + tally.local
        table.add_row(
            budget,
            f"[{colour}]{_bar(state.spend_pico, state.limit_pico, state.soft_limit_percent)}[/]",
            "$" + format_usd(state.spend_pico, 2),
            "-" if state.limit_pico is None else "$" + format_usd(state.limit_pico, 2),
            f"[{colour}]{state.status}[/]" + (" (stale)" if state.stale else ""),
            f"{tally.cloud * 100 // served if served else 0} %",
            f"{tally.local * 100 // served if served else 0} %",
            str(tally.fallbacks),
            str(tally.rejected),
        )
    return table


def print_summary(summary: dict[str, Any], demo: Demo) -> None:
    """The month's books, the pipeline's beside the demo's own count, and the verdict."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"budgetflow demo · {summary['period']} summary", title_justify="left")
    columns = ("spend (pipeline)", "counted by the demo", "cloud", "local", "fallbacks", "rejected", "saved by shift")
    for column in ("budget", *columns):
        table.add_column(column, justify="left" if column == "budget" else "right")

    def usd(text: str) -> str:
        return "$" + format_usd(parse_usd(text), 2)

    for budget, row in summary["budgets"].items():
        month = summary["period"]
        table.add_row(
            budget,
            usd(row["pipeline_settled_usd"].get(month, "0")),
            usd(row["demo_counted_usd"].get(month, "0")),
            str(row["cloud"]),
            str(row["local"]),
            str(row["fallbacks"]),
            str(row["rejected"]),
            usd(row["saved_by_shift_usd"]),
        )
    console.print(table)
    verdict = "[green]exact to the pico-dollar[/]" if summary["exact"] else "[red]NOT exact[/]"
    console.print(
        f"{summary['requests_sent']} requests through the gateway; pipeline totals vs the demo's own count: "
        f"{verdict}; {summary['dead_letters']} dead letters ({summary['malformed_events']} malformed events "
        f"sent); status changes seen: {', '.join(summary['transitions'])}; "
        f"rolled over to {demo.next_period}: {summary['rolled_over']}"
    )
    saved = sum(int(r["saved_by_shift_usd"].replace(".", "")) for b, r in summary["budgets"].items() if b == "global")
    console.print(f"the soft-limit shift to local models saved ${format_usd(saved, 2)} of cloud spend this month")
    down_from, down_until = (datetime.fromisoformat(t) for t in summary["local_outage"])
    overall = summary["budgets"]["global"]
    console.print(
        f"the local model was down from {down_from:%b %d %H:%M} to {down_until:%b %d %H:%M}: "
        f"{overall['fallbacks']} shifted requests fell back to cloud, {overall['unserved']} found no model "
        "(cloud blocked)"
    )
