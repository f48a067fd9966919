"""The workers' HTTP endpoints (the stats API, enrich's /metrics) listen on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(180)


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            # /proc prints the address as 32-bit words in host order.
            packed = b"".join(struct.pack("=I", int.from_bytes(raw[i : i + 4], "big")) for i in range(0, len(raw), 4))
            found.add((str(ipaddress.ip_address(socket.inet_ntop(family, packed))), int(port, 16)))
    return found


async def test_workers_listen_on_localhost_by_default(pipeline_factory: Any, kit: Any) -> None:
    pipeline, _ = await kit.start(pipeline_factory, n=10)
    assert "BUDGETFLOW_WEB__HOST" not in pipeline.env_base
    workers = [pipeline.start("enrich"), pipeline.start("aggregate")]
    deadline = time.monotonic() + 90
    sockets: dict[str, set[tuple[str, int]]] = {}
    while time.monotonic() < deadline:
        sockets = {w.role: listening(w.proc.pid) for w in workers if w.alive}
        if len(sockets) == 2 and all(sockets.values()):
            break
        await asyncio.sleep(0.3)
    assert len(sockets) == 2, pipeline.logs()
    assert all(sockets.values()), f"a worker never listened: {sockets}\n{pipeline.logs()}"
    for role, addresses in sockets.items():
        assert {address for address, _ in addresses} == {"127.0.0.1"}, (role, addresses)
