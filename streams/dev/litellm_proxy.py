"""A LiteLLM proxy as a child process, for `budgetflow litellm`, `budgetflow bench --only litellm` and the tests.

The command line and the process group (``litellm --config ...``, stopped with its workers), and for the bench and
the tests a proxy of their own: a config with models mocked by LiteLLM's ``mock_response`` (no provider is called),
keys and teams from a ``custom_auth`` hook that reads them from the environment (LiteLLM's key database needs
Prisma engines from a CDN), budgetflow's callback loaded by the config's callbacks line or not at all, readiness,
and one chat completion as a client sees it. This module never imports LiteLLM or budgetflow's integration: the
proxy process does, by its config.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from budgetflow.streams.dev.localhost import free_port
from budgetflow.streams.service.launch import die_with_parent, log_tail

__all__ = [
    "CALLBACK",
    "KEYS_ENV",
    "NOT_INSTALLED",
    "Answer",
    "Proxy",
    "chat",
    "installed",
    "litellm_script",
    "mocked_model",
    "proxy_command",
    "spawn_proxy",
    "stop_group",
]

CALLBACK = "budgetflow.integrations.litellm.callback"  # the config's callbacks line (docs/litellm.md)
NOT_INSTALLED = "LiteLLM is not installed here: pip install 'budgetflow[litellm-proxy]'"
KEYS_ENV = "BUDGETFLOW_TEST_LITELLM_KEYS"  # the harness's namespace: not a setting
AUTH_MODULE = "bf_dev_auth"
# The custom auth hook, written beside the config: each key of the JSON in KEYS_ENV maps to the fields of its
# UserAPIKeyAuth (team_id, metadata, team_metadata, max_budget, ...); any other key is a 401.
AUTH = f"""
import json, os
from fastapi import HTTPException
from litellm.proxy._types import UserAPIKeyAuth

KEYS = json.loads(os.environ["{KEYS_ENV}"])


async def user_api_key_auth(request, api_key):
    key = api_key[7:] if api_key.lower().startswith("bearer ") else api_key
    entry = KEYS.get(key)
    if entry is None:
        raise HTTPException(status_code=401, detail="invalid API key")
    return UserAPIKeyAuth(api_key=key, **entry)
"""


def installed() -> bool:
    """LiteLLM and its proxy's server in this interpreter, and its `litellm` script beside it."""
    return (
        all(importlib.util.find_spec(name) is not None for name in ("litellm", "fastapi", "uvicorn"))
        and litellm_script().exists()
    )


def litellm_script() -> Path:
    return Path(sys.executable).with_name("litellm")


def proxy_command(config: Path, host: str, port: int, workers: int = 1) -> list[str]:
    """``litellm --config CONFIG --host HOST --port PORT`` (and ``--num_workers N`` for more than one)."""
    command = [str(litellm_script()), "--config", str(config), "--host", host, "--port", str(port)]
    return command + (["--num_workers", str(workers)] if workers > 1 else [])


def spawn_proxy(
    command: Sequence[str], env: Mapping[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """The proxy in a process group of its own (its workers with it, stopped by :func:`stop_group`; a Ctrl-C
    reaches only the caller, which stops the proxy with SIGTERM first so that its last usage is published),
    dying with the caller, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # noqa: PLW1509  # started from the main thread, before any request
        )


def stop_group(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM to the process group, then SIGKILL to whatever of it is left after ``timeout_s``."""
    group = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _group_alive(group, proc):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    proc.wait(timeout=10)


def _group_alive(group: int, proc: subprocess.Popen[bytes]) -> bool:
    proc.poll()  # reap the leader, so that it does not count as a member
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def mocked_model(
    name: str,
    deployed: str,
    *,
    mock: str | None = "mocked answer",
    model_info: Mapping[str, Any] | None = None,
    **params: Any,
) -> dict[str, Any]:
    """A model group of the proxy's ``model_list`` whose deployment answers ``mock`` (None: it calls ``deployed``
    for real, as a model that is down does); ``params`` go to its ``litellm_params``."""
    litellm_params: dict[str, Any] = {"model": deployed, "api_key": "sk-not-used", **params}
    if mock is not None:
        litellm_params["mock_response"] = mock
    entry: dict[str, Any] = {"model_name": name, "litellm_params": litellm_params}
    if model_info is not None:
        entry["model_info"] = dict(model_info)
    return entry


class Proxy:
    """``litellm --config`` as a process: its config, auth hook and log under ``root``, on a free port."""

    def __init__(
        self,
        env_base: Mapping[str, str],
        root: Path,
        *,
        models: list[dict[str, Any]],
        keys: Mapping[str, Mapping[str, Any]],
        workers: int = 1,
        callback: bool = True,
        env: Mapping[str, str] | None = None,
        router_settings: Mapping[str, Any] | None = None,
        general_settings: Mapping[str, Any] | None = None,
        litellm_settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        (root / f"{AUTH_MODULE}.py").write_text(AUTH)
        config: dict[str, Any] = {
            "model_list": models,
            "general_settings": {
                "custom_auth": f"{AUTH_MODULE}.user_api_key_auth",
                "master_key": "sk-" + secrets.token_hex(32),  # LiteLLM refuses to start without one
                **(general_settings or {}),
            },
            "litellm_settings": {**({"callbacks": CALLBACK} if callback else {}), **(litellm_settings or {})},
        }
        if router_settings:
            config["router_settings"] = dict(router_settings)
        self.config = root / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.env = {
            **env_base,
            "BUDGETFLOW_DATA_DIR": str(root / "data"),
            KEYS_ENV: json.dumps(keys),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no internet: the cost map ships with LiteLLM
            **(env or {}),
        }
        self.workers = workers
        self.log = root / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proxy:
        command = proxy_command(self.config, "127.0.0.1", self.port, self.workers)
        self.proc = spawn_proxy(command, self.env, self.log, cwd=self.root)
        return self

    async def ready(self, http: aiohttp.ClientSession, timeout_s: float = 180) -> None:
        """Wait until the proxy answers, several times in a row per worker (liveliness is answered by whichever
        worker accepts the connection, so one answer says little about the others)."""
        deadline = time.monotonic() + timeout_s
        streak = 0
        while streak < 3 * self.workers:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the LiteLLM proxy exited:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the LiteLLM proxy did not answer in {timeout_s:.0f} s:\n{self.tail()}")
            try:
                async with http.get(f"{self.base}/health/liveliness") as response:
                    streak = streak + 1 if response.status == 200 else 0
            except aiohttp.ClientError:
                streak = 0
                await asyncio.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_group(self.proc)

    def tail(self, lines: int = 40) -> str:
        return log_tail(self.log, lines)


Answer = tuple[int, dict[str, str], dict[str, Any] | None, dict[str, Any] | None]


async def chat(http: aiohttp.ClientSession, proxy: Proxy, key: str, body: Mapping[str, Any]) -> Answer:
    """One chat completion: (status, headers in lower case, usage as the proxy reported it, the error body if
    any). A streamed one is read to its end; its usage is the last chunk's (``stream_options.include_usage``)."""
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(f"{proxy.base}/v1/chat/completions", json=body, headers=headers) as response:
        raw = await response.read()
        got = {k.lower(): v for k, v in response.headers.items()}
        if response.status != 200:
            try:
                error = json.loads(raw) if raw else None
            except ValueError:
                error = {"raw": raw[:200].decode(errors="replace")}
            return response.status, got, None, error
        if not body.get("stream"):
            return response.status, got, json.loads(raw).get("usage"), None
        usage = None
        for line in raw.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                usage = json.loads(line[6:]).get("usage") or usage
        return response.status, got, usage, None
