"""A fake OpenAI upstream for the LiteLLM tests, where ``mock_response`` cannot go: a marker at the start of the
last user message chooses what it does (FAILONCE: a 500 the first time, FAILALWAYS: always a 500, HANG: answers
after ``hang_s``); otherwise it answers with 11 prompt and 7 completion tokens."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from aiohttp import web

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


class FakeOpenAI:
    def __init__(self, hang_s: float = 5.0) -> None:
        self.hits: Counter[str] = Counter()
        self.hang_s = hang_s
        self._runner: web.AppRunner | None = None
        self.base = ""

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        text = str(body["messages"][-1]["content"])
        self.hits[text] += 1
        if text.startswith("FAILALWAYS") or (text.startswith("FAILONCE") and self.hits[text] == 1):
            return web.json_response({"error": {"message": "upstream error", "type": "server_error"}}, status=500)
        if text.startswith("HANG"):
            await asyncio.sleep(self.hang_s)
        answer = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "gpt-4o"),
                "choices": [answer],
                "usage": USAGE,
            }
        )

    async def __aenter__(self) -> FakeOpenAI:
        from budgetflow.streams.dev.localkafka import free_port

        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.base = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
