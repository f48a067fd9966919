"""Every Kafka producer that budgetflow runs outside its development tools writes with ``acks=all``, idempotently.

On a cluster (``TOPICS__REPLICATION_FACTOR=3``, ``min.insync.replicas=2``) a write acknowledged by the leader
alone is lost when that leader dies before a follower copied it; ``acks=all`` makes the broker answer only once
two replicas hold it. The gateway publisher, enrich, the aggregate (changelog, statuses, ticks), lease asks and the
operator tools all say so explicitly; this finds every ``AIOKafkaProducer(...)`` in the package and checks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Benchmarks, the demo and the local broker: development tools, never on a production money path.
EXEMPT = ("streams/dev/",)


def producer_calls() -> list[tuple[str, ast.Call]]:
    found = []
    for folder in ("schemas", "tokenizers", "streams", "integrations"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name.startswith(EXEMPT):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "AIOKafkaProducer":
                    found.append((f"{name}:{node.lineno}", node))
    return found


def test_every_producer_on_the_money_path_waits_for_the_in_sync_replicas() -> None:
    calls = producer_calls()
    assert len(calls) >= 6, calls  # publisher, enrich, aggregate, lease asks, policy apply, ledger adjust, notify
    wrong = []
    for where, call in calls:
        options = {k.arg: k.value for k in call.keywords if k.arg is not None}
        acks, idempotent = options.get("acks"), options.get("enable_idempotence")
        if not (isinstance(acks, ast.Constant) and acks.value == "all"):
            wrong.append(f"{where}: acks is not 'all'")
        if not (isinstance(idempotent, ast.Constant) and idempotent.value is True):
            wrong.append(f"{where}: not idempotent")
    assert wrong == [], "\n".join(wrong)
