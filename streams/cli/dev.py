"""The developer's commands: `budgetflow simulate`, `budgetflow demo` and `budgetflow bench`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from budgetflow.streams.cli.context import Context, pass_ctx

__all__ = ["bench", "demo", "simulate"]


# -- simulate -------------------------------------------------------------------
@click.group()
def simulate() -> None:
    """Simulations of routing policy (no broker needed)."""


@simulate.command("shift")
@click.option("--requests", default=200_000, show_default=True, help="Requests in the simulated month.")
@click.option("--seed", default=1, show_default=True, help="Random seed.")
@click.option("--overspend", default=1.6, show_default=True, help="Cloud cost of the traffic, times the limit.")
def simulate_shift_cmd(requests: int, seed: int, overspend: float) -> None:
    """A month of traffic with and without the soft-limit shift: cloud spend in the 80-100 % band."""
    from budgetflow.schemas.money import format_usd
    from budgetflow.streams.dev.simulate import simulate_shift

    r = simulate_shift(requests, seed, overspend)
    days = (r.band_start_s / 86_400, r.band_end_s / 86_400)
    click.echo(
        f"budget ${format_usd(r.limit_pico, 2)}, soft limit 75 %, {r.requests:,} requests whose cloud cost "
        f"is {overspend:g} x the limit"
    )
    click.echo(f"80-100 % band of the run without the shift: day {days[0]:.1f} to day {days[1]:.1f}")
    click.echo(
        f"cloud spend in that band: without the shift ${format_usd(r.without_band_spend, 2)}, "
        f"with it ${format_usd(r.with_band_spend, 2)}: {r.reduction_percent:.1f} % less"
    )
    click.echo(f"cloud requests over the month: {r.without_cloud_requests:,} without, {r.with_cloud_requests:,} with")


# -- demo -----------------------------------------------------------------------
@click.command("demo")
@click.option(
    "--duration",
    default=60.0,
    show_default=True,
    envvar="BUDGETFLOW_DEMO_DURATION_S",
    show_envvar=True,
    help="Wall-clock seconds the simulated month lasts.",
)
@click.option("--requests", default=3000, show_default=True, help="Requests sent through the gateway.")
@click.option("--seed", default=2026, show_default=True, help="Random seed of the traffic.")
@click.option("--keep-running", is_flag=True, help="Leave the workers, gateway and broker up after the summary.")
@click.option(
    "--summary-json",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the summary as JSON here.",
)
@pass_ctx
def demo(
    ctx: Context, duration: float, requests: int, seed: int, keep_running: bool, summary_json: Path | None
) -> None:
    """A month of LLM traffic through the real pipeline in about a minute, watched live."""
    from budgetflow.streams.dev.demo import DemoConfig, run_demo

    config = DemoConfig(
        duration_s=duration, requests=requests, seed=seed, keep_running=keep_running, summary_json=summary_json
    )
    sys.exit(run_demo(config, ctx.settings()))


# -- bench --------------------------------------------------------------------
@click.command("bench")
@click.option("--only", multiple=True, help="Run only this section (repeatable).")
@click.option("--quick", is_flag=True, envvar="BUDGETFLOW_BENCH_QUICK", show_envvar=True, help="Tiny sizes (for CI).")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench-results/bench.json"),
    help="Where the JSON results go.",
)
def bench(only: tuple[str, ...], quick: bool, out: Path) -> None:
    """Measure budgetflow beside its baselines in the same run; print a table, write JSON."""
    from budgetflow.streams.dev.bench import run_bench
    from budgetflow.streams.dev.bench_report import render

    try:
        results = run_bench(list(only) or None, quick, out)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--only") from exc
    click.echo(render(results))
    click.echo(f"\nresults: {out}")
