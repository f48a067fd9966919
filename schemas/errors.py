"""The errors budgetflow raises, as one small tree.

    BudgetflowError
    ├── ConfigError        a setting, policy or price file is wrong (one line names it)
    │   └── VocabularyError  a shipped tokenizer vocabulary is missing or altered (budgetflow.tokenizers)
    ├── InvalidEvent       a record failed decoding or validation (it goes to the DLQ)
    ├── BrokerUnreachable  a one-shot command found no broker (budgetflow.streams.cli.context: exit 1, one line)
    └── LocalKafkaError    the development broker could not be fetched, started or stopped

Third-party errors (pydantic, orjson, aiokafka) are translated where they are
caught, with ``raise ... from exc``, so the rest of the code sees only these.
"""

from __future__ import annotations

__all__ = ["BudgetflowError", "ConfigError", "InvalidEvent", "LocalKafkaError"]


class BudgetflowError(Exception):
    """Base of every error budgetflow raises on purpose."""


class ConfigError(BudgetflowError):
    """A setting, policy or price file is invalid; the message is one line naming it."""


class InvalidEvent(BudgetflowError):
    """A record could not be decoded or validated.

    ``reason`` is a short, bounded code (it becomes a metric label and a DLQ
    header); the message says which field and why, and never echoes content.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class LocalKafkaError(BudgetflowError):
    """The local development broker could not be fetched, started or stopped."""
