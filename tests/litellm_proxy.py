"""A real LiteLLM proxy for the tests and the bench: models mocked with LiteLLM's ``mock_response`` (no provider is
called), keys and teams from a custom auth hook (LiteLLM's key database needs Prisma engines from a CDN), and
budgetflow's callback loaded the way docs/litellm.md says, with the pipeline's settings in its environment."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

HAVE_LITELLM = importlib.util.find_spec("litellm") is not None and importlib.util.find_spec("fastapi") is not None
SKIP_REASON = "LiteLLM is not installed: pip install 'budgetflow[litellm-proxy]' (CI installs it)"

AUTH = """
import json, os
from fastapi import HTTPException
from litellm.proxy._types import UserAPIKeyAuth

KEYS = json.loads(os.environ["BUDGETFLOW_TEST_LITELLM_KEYS"])


async def user_api_key_auth(request, api_key):
    key = api_key[7:] if api_key.lower().startswith("bearer ") else api_key
    entry = KEYS.get(key)
    if entry is None:
        raise HTTPException(status_code=401, detail="invalid API key")
    return UserAPIKeyAuth(api_key=key, team_id=entry.get("team_id"), metadata=entry.get("metadata") or {},
                          team_metadata=entry.get("team_metadata"))
"""


def key_budget(key: str) -> str:
    """The budget of an ``sk-`` key as the integration names it."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def model(name: str, deployed: str, *, mock: str | None = "mocked answer", **params: Any) -> dict[str, Any]:
    litellm_params: dict[str, Any] = {"model": deployed, "api_key": "sk-not-used", **params}
    if mock is not None:
        litellm_params["mock_response"] = mock
    return {"model_name": name, "litellm_params": litellm_params}


class Proxy:
    """``litellm --config`` as a process: its config, auth hook and log under ``root``."""

    def __init__(
        self,
        env_base: dict[str, str],
        root: Path,
        *,
        models: list[dict[str, Any]],
        keys: dict[str, dict[str, Any]],
        workers: int = 1,
        callback: bool = True,
        env: dict[str, str] | None = None,
        router_settings: dict[str, Any] | None = None,
    ) -> None:
        from budgetflow.streams.dev.localkafka import free_port

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        (root / "bf_test_auth.py").write_text(AUTH)
        config: dict[str, Any] = {
            "model_list": models,
            "general_settings": {
                "custom_auth": "bf_test_auth.user_api_key_auth",
                "master_key": "sk-" + secrets.token_hex(32),  # LiteLLM refuses to start without one
            },
            "litellm_settings": {"callbacks": "budgetflow.integrations.litellm.callback"} if callback else {},
        }
        if router_settings:
            config["router_settings"] = router_settings
        (root / "config.yaml").write_text(yaml.safe_dump(config))
        self.env = {
            **env_base,
            "BUDGETFLOW_DATA_DIR": str(root / "data"),
            "BUDGETFLOW_TEST_LITELLM_KEYS": json.dumps(keys),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no internet: the cost map ships with LiteLLM
            **(env or {}),
        }
        self.workers = workers
        self.log = root / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proxy:
        command = [
            str(Path(sys.executable).parent / "litellm"),
            "--config",
            str(self.root / "config.yaml"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if self.workers > 1:
            command += ["--num_workers", str(self.workers)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=self.root, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    async def ready(self, http: aiohttp.ClientSession, timeout_s: float = 120) -> None:
        """Wait until every worker answers (a chat request per worker would be needed to be sure; liveliness is
        answered by whichever worker accepts, so wait until it has answered several times in a row)."""
        deadline = time.monotonic() + timeout_s
        streak = 0
        while streak < 3 * self.workers:
            assert self.proc is not None
            assert self.proc.poll() is None, f"the proxy exited:\n{self.tail()}"
            assert time.monotonic() < deadline, f"the proxy never answered:\n{self.tail()}"
            try:
                async with http.get(f"{self.base}/health/liveliness") as response:
                    streak = streak + 1 if response.status == 200 else 0
            except aiohttp.ClientError:
                streak = 0
                await asyncio.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def chat(
    http: aiohttp.ClientSession,
    proxy: Proxy,
    key: str,
    body: dict[str, Any],
) -> tuple[int, dict[str, str], dict[str, Any] | None, dict[str, Any] | None]:
    """One chat completion: (status, headers, usage as the proxy reported it, the error body if any). A streamed
    one is read to its end; its usage is the last chunk's (``stream_options.include_usage``)."""
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(f"{proxy.base}/v1/chat/completions", json=body, headers=headers) as response:
        raw = await response.read()
        got = {k.lower(): v for k, v in response.headers.items()}
        if response.status != 200:
            return response.status, got, None, json.loads(raw) if raw else None
        if not body.get("stream"):
            return response.status, got, json.loads(raw).get("usage"), None
        usage = None
        for line in raw.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
        return response.status, got, usage, None
