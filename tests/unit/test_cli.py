"""The console script: help works, errors are one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(sys.executable).with_name("budgetflow"))


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, env=env, timeout=60)


def test_help_lists_the_commands() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    assert "kafka" in proc.stdout
    assert "settings" in proc.stdout


def test_options_show_their_environment_variable() -> None:
    proc = run("kafka", "start", "--help")
    assert proc.returncode == 0
    assert "BUDGETFLOW_LOCAL_KAFKA__PORT" in proc.stdout
    assert "BUDGETFLOW_DATA_DIR" in proc.stdout


def test_a_bad_setting_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS": "nope"}
    proc = run("kafka", "status", "--data-dir", str(tmp_path), env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [lines[0]]
    assert "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS" in lines[0]
    assert "Traceback" not in proc.stderr


def test_settings_command_lists_variables() -> None:
    proc = run("settings", env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert proc.returncode == 0
    assert "BUDGETFLOW_TOPICS__PARTITIONS" in proc.stdout


@pytest.mark.parametrize("args", [("kafka", "status"), ("kafka", "stop")])
def test_status_and_stop_without_a_broker(tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = run(*args, "--data-dir", str(tmp_path), env={"PATH": "/usr/bin:/bin"})
    assert "not running" in proc.stderr
    assert proc.returncode == (1 if args[1] == "status" else 0)


def test_every_option_variable_is_a_setting_or_a_known_command_variable() -> None:
    import click

    from budgetflow.schemas.settings import COMMAND_ENV, setting_rows
    from budgetflow.streams.cli import cli

    settings = {name for name, _, _ in setting_rows()}
    seen = set()

    def walk(command: click.Command) -> None:
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar:
                seen.add(param.envvar)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(cli)
    assert seen
    assert seen <= settings | COMMAND_ENV, seen - settings - COMMAND_ENV


def test_settings_write_replaces_the_table_between_the_markers_of_any_markdown_file(tmp_path: Path) -> None:
    from budgetflow.streams.cli import settings_markdown

    page = tmp_path / "operations.md"
    page.write_text("# Ops\n\n<!-- settings:begin -->\n| old |\n<!-- settings:end -->\n\nafter\n")
    proc = run("settings", "--write", str(page), env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert page.read_text() == (
        "# Ops\n\n<!-- settings:begin -->\n" + settings_markdown() + "\n<!-- settings:end -->\n\nafter\n"
    )


@pytest.mark.parametrize(
    "text",
    ["no markers\n", "x\n<!-- settings:end -->\n<!-- settings:begin -->\n"],
    ids=["none", "end-before-begin"],
)
def test_settings_write_refuses_a_file_without_the_markers(tmp_path: Path, text: str) -> None:
    page = tmp_path / "page.md"
    page.write_text(text)
    proc = run("settings", "--write", str(page), env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "has no settings markers" in proc.stderr
    assert page.read_text() == text


def test_a_broker_lost_during_a_command_is_the_same_one_line_and_exit_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiokafka.errors import KafkaConnectionError

    from budgetflow.streams import cli
    from budgetflow.streams.kafka import clients
    from budgetflow.streams.ops import readback

    async def answers(*_: object) -> None:
        return None

    async def gone(*_: object) -> None:
        raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9, 2)]")

    monkeypatch.setattr(clients, "unreachable", answers)  # the broker answered the check...
    monkeypatch.setattr(readback, "read_statuses", gone)  # ...and went away before the read
    monkeypatch.setattr("sys.argv", ["budgetflow", "status"])
    monkeypatch.setenv("BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9")
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("budgetflow: no Kafka broker answers at 127.0.0.1:9 (")
    assert "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS" in line


@pytest.mark.parametrize(
    ("option", "refused"), [("--port=9092", "--port is for one broker"), ("--secure=x", "--secure")]
)
def test_a_cluster_takes_free_ports_and_no_secure_dir(tmp_path: Path, option: str, refused: str) -> None:
    proc = run("kafka", "start", "--brokers", "3", option, "--data-dir", str(tmp_path), env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert refused in proc.stderr
