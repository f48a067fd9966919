"""`budgetflow litellm` end to end, as docs/litellm.md says to run it: against the session broker (it starts the
workers and a LiteLLM proxy with the example config), one chat completion through the OpenAI SDK with its budget
header, and Ctrl-C (SIGINT) stops everything it started and exits 0. Without LiteLLM it says so in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from budgetflow.streams.dev.localhost import free_port, pid_alive, port_open

pytestmark = pytest.mark.timeout(420)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def wait_for(condition, timeout_s: float, what: str, proc: subprocess.Popen[bytes], out: Path, err: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(
                f"budgetflow litellm exited ({proc.returncode}) before {what}:\n{out.read_text()}\n{err.read_text()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} in {timeout_s:.0f} s:\n{out.read_text()}\n{err.read_text()}")
        time.sleep(0.3)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_litellm_command_serves_then_stops_everything_on_ctrl_c(
    kafka_bootstrap: str, tmp_path: Path, budgetflow_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # importing LiteLLM here fetches nothing
    pytest.importorskip("litellm", reason="LiteLLM is not installed: pip install 'budgetflow[litellm-proxy]'")
    from openai import OpenAI

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    env.update(
        {
            "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,  # the session broker: none is started
            "BUDGETFLOW_TOPICS__PREFIX": f"ll{uuid.uuid4().hex[:8]}.",
            "BUDGETFLOW_DATA_DIR": str(tmp_path / "data"),
        }
    )
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            budgetflow_cli("litellm", "--port", str(port)), env=env, stdout=stdout, stderr=stderr, cwd=tmp_path
        )
    try:
        wait_for(lambda: "Ctrl-C stops" in out.read_text(), 300, "ready proxy", proc, out, err)
        printed = out.read_text()
        assert f"http://127.0.0.1:{port}" in printed
        assert f"curl -s http://127.0.0.1:{port}/v1/chat/completions" in printed

        client = OpenAI(base_url=f"http://127.0.0.1:{port}", api_key="sk-demo", max_retries=0, timeout=60)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
        # A new team:search is below its soft limit: the cloud group answers, with its reservation in the header.
        assert Decimal(raw.headers["x-budget-cost-estimated"]) > 0
        assert raw.headers["x-budgetflow-backend"] == "cloud"
        assert raw.parse().choices[0].message.content == "hello from cloud"

        started = descendants(proc.pid)
        assert len(started) >= 3, started  # the enrich and aggregate workers and the proxy (and its children)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, f"{out.read_text()}\n{err.read_text()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    left = sorted(p for p in started if pid_alive(p))
    assert left == [], f"processes left running: {left}"
    assert not port_open(port)


def test_litellm_command_without_litellm_is_one_line(tmp_path: Path) -> None:
    """No LiteLLM in the interpreter: one line that says what to install, exit status 1, nothing started."""
    code = (
        "import sys; sys.modules['litellm'] = None; sys.argv = ['budgetflow', 'litellm']\n"
        "from budgetflow.streams.cli import main\nmain()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETFLOW_")}
    env["BUDGETFLOW_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [
        "budgetflow: LiteLLM is not installed here: pip install 'budgetflow[litellm-proxy]'"
    ]
    assert not (tmp_path / "data").exists()
