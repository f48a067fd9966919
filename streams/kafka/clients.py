"""aiokafka client options from the settings: the one place Kafka connections are configured."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from budgetflow.schemas.settings import KafkaSettings

__all__ = ["client_options", "group_consumer", "unreachable"]


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments shared by every aiokafka producer, consumer and admin client.

    Secrets are unwrapped here, at the last moment, and nowhere else.
    """
    security = kafka.security
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": kafka.client_id,
        "request_timeout_ms": kafka.request_timeout_ms,
        "security_protocol": security.protocol,
    }
    if security.protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        context = create_ssl_context(
            cafile=str(security.ssl_cafile) if security.ssl_cafile else None,
            certfile=str(security.ssl_certfile) if security.ssl_certfile else None,
            keyfile=str(security.ssl_keyfile) if security.ssl_keyfile else None,
            password=security.ssl_key_password.get_secret_value() if security.ssl_key_password else None,
        )
        context.check_hostname = security.ssl_check_hostname
        options["ssl_context"] = context
    if security.protocol.startswith("SASL_"):
        assert security.sasl_password is not None  # the settings validator guarantees it
        options["sasl_mechanism"] = security.sasl_mechanism
        options["sasl_plain_username"] = security.sasl_username
        options["sasl_plain_password"] = security.sasl_password.get_secret_value()
    return options


def group_consumer(kafka: KafkaSettings, group_id: str, *topics: str, **extra: Any) -> Any:
    """A consumer in ``group_id`` on ``topics``, as every budgetflow worker reads: offsets committed by the worker
    (never automatically), from the earliest record when the group has none, with the configured session timeouts.
    ``extra`` adds consumer options (``max_poll_records``, ``isolation_level``, ...)."""
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(
        *topics,
        **client_options(kafka),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=kafka.session_timeout_ms,
        heartbeat_interval_ms=kafka.heartbeat_interval_ms,
        **extra,
    )


class _LastError(logging.Handler):
    """Keeps the last message aiokafka logs while a probe runs (it logs why a host failed, then raises a summary)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # 'Unable connect to "%s:%s": %s': the cause is the last argument; the caller names the address
        args = record.args if isinstance(record.args, tuple) else ()
        self.message = str(args[-1]) if args else record.getMessage()


async def unreachable(kafka: KafkaSettings, timeout_s: float) -> str | None:
    """Why no bootstrap server answers a metadata request within ``timeout_s`` (None when one does).

    For one-shot commands: a connection attempt bounded in time, cleaned up whatever happens, aiokafka's own log
    lines kept out of the way (its last one becomes the reason).
    """
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    aiokafka_log = logging.getLogger("aiokafka")
    last = _LastError()
    propagate = aiokafka_log.propagate
    aiokafka_log.addHandler(last)
    aiokafka_log.propagate = False
    client = AIOKafkaClient(**{**client_options(kafka), "request_timeout_ms": max(int(timeout_s * 1000), 1)})
    try:
        await asyncio.wait_for(client.bootstrap(), timeout_s)
    except TimeoutError:
        return last.message or f"no answer within {timeout_s:g} s"
    except (KafkaError, OSError) as exc:
        return last.message or str(exc)
    finally:
        await client.close()
        aiokafka_log.removeHandler(last)
        aiokafka_log.propagate = propagate
    return None
