"""Generator of helm/budgetflow/values.schema.json, the JSON Schema Helm validates every values file against.

Regenerate after changing the chart's values or budgetflow's settings (tests/unit/test_helm_chart.py
checks the checked-in file agrees)::

    .venv/bin/python helm/values_schema.py > helm/budgetflow/values.schema.json

Every object is closed (``additionalProperties: false``), so a misspelt key fails ``helm install`` at
once; ``settings`` accepts only the environment variables budgetflow knows (from its settings model), and
not those the chart sets itself.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from budgetflow.schemas.settings import setting_rows

# The variables the chart sets from structured values (or per pod): not allowed in `settings`.
OWNED = {
    "BUDGETFLOW_DATA_DIR",
    "BUDGETFLOW_TESTING",
    "BUDGETFLOW_KAFKA__BOOTSTRAP_SERVERS",
    "BUDGETFLOW_KAFKA__CLIENT_ID",
    "BUDGETFLOW_KAFKA__SESSION_TIMEOUT_MS",
    "BUDGETFLOW_KAFKA__HEARTBEAT_INTERVAL_MS",
    "BUDGETFLOW_TOPICS__PREFIX",
    "BUDGETFLOW_TOPICS__PARTITIONS",
    "BUDGETFLOW_TOPICS__REPLICATION_FACTOR",
    "BUDGETFLOW_TOPICS__REQUESTS_RETENTION_MS",
    "BUDGETFLOW_TOPICS__REQUESTS_SEGMENT_MS",
    "BUDGETFLOW_PRICING__FILE",
    "BUDGETFLOW_WEB__HOST",
    "BUDGETFLOW_WEB__PORT",
    "BUDGETFLOW_WEB__ADVERTISED_URL",
    "BUDGETFLOW_WEB__BEARER_TOKEN",
    "BUDGETFLOW_WEB__PEERS",
    "BUDGETFLOW_WEB__PEER_TOKEN",
    "BUDGETFLOW_METRICS__PORT",
    "BUDGETFLOW_NOTIFY__WEBHOOK_URL",  # a secret: it would come from a Secret, never from plain values
}
# Not for a deployment: the local broker, the simulated clock, and secrets (which come from Secrets).
EXCLUDED_PREFIXES = ("BUDGETFLOW_LOCAL_KAFKA__", "BUDGETFLOW_CLOCK__", "BUDGETFLOW_KAFKA__SECURITY__")


def obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    return {**schema, **extra}


def string(**extra: Any) -> dict[str, Any]:
    return {"type": "string", **extra}


def integer(minimum: int = 0, **extra: Any) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, **extra}


def boolean() -> dict[str, Any]:
    return {"type": "boolean"}


def free_map() -> dict[str, Any]:
    return {"type": "object"}


QUANTITY = {
    "anyOf": [
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"},
        {"type": "number", "minimum": 0},
    ]
}
RESOURCES = obj(
    {
        "requests": obj({"cpu": QUANTITY, "memory": QUANTITY}),
        "limits": obj({"cpu": QUANTITY, "memory": QUANTITY}),
    }
)
PDB = obj({"enabled": boolean(), "maxUnavailable": integer(1)}, ["enabled", "maxUnavailable"])
SECRET_KEY = obj({"name": string(), "key": string(minLength=1)}, ["name", "key"])
PORT = integer(1, maximum=65535)


def settings_names() -> list[str]:
    names = [row[0] for row in setting_rows()]
    return sorted(n for n in names if n not in OWNED and not n.startswith(EXCLUDED_PREFIXES))


def schema() -> dict[str, Any]:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "budgetflow Helm chart values",
        **obj(
            {
                "image": obj(
                    {
                        "repository": string(minLength=1),
                        "tag": string(),
                        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                        "pullSecrets": {"type": "array", "items": string(minLength=1)},
                    },
                    ["repository", "tag", "pullPolicy"],
                ),
                "kafka": obj(
                    {
                        "bootstrapServers": string(pattern=r"^[^,\s:]+:[0-9]{1,5}(,[^,\s:]+:[0-9]{1,5})*$"),
                        "securityProtocol": {"enum": ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]},
                        "saslMechanism": {"enum": ["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]},
                        "saslSecret": obj(
                            {"name": string(), "usernameKey": string(minLength=1), "passwordKey": string(minLength=1)},
                            ["name", "usernameKey", "passwordKey"],
                        ),
                        "caSecret": SECRET_KEY,
                        "clientCertSecret": obj(
                            {"name": string(), "certKey": string(minLength=1), "keyKey": string(minLength=1)},
                            ["name", "certKey", "keyKey"],
                        ),
                        "checkHostname": boolean(),
                        "sessionTimeoutMs": integer(3000),
                        "heartbeatIntervalMs": integer(100),
                    },
                    ["bootstrapServers", "securityProtocol"],
                ),
                "topics": obj(
                    {
                        "prefix": string(pattern=r"^[A-Za-z0-9._-]{0,180}$"),
                        "partitions": integer(1, maximum=1024),
                        "replicationFactor": integer(1, maximum=16),
                        "requestsRetentionMs": integer(1000),
                        "requestsSegmentMs": integer(1000),
                    },
                    ["prefix", "partitions", "replicationFactor"],
                ),
                "policies": obj(
                    {"budgets": {"type": "array", "items": {"type": "object", "required": ["id"]}}}, ["budgets"]
                ),
                "prices": free_map(),
                "settings": {
                    "type": "object",
                    "propertyNames": {"enum": settings_names()},
                    "additionalProperties": {"type": ["string", "number", "boolean"]},
                },
                "setup": obj(
                    {
                        "enabled": boolean(),
                        "activeDeadlineSeconds": integer(1),
                        "backoffLimit": integer(0),
                        "resources": RESOURCES,
                    },
                    ["enabled"],
                ),
                "enrich": obj(
                    {
                        "replicas": integer(0),
                        "resources": RESOURCES,
                        "autoscaling": obj(
                            {
                                "enabled": boolean(),
                                "minReplicas": integer(1),
                                "maxReplicas": integer(1),
                                "targetCPUUtilizationPercentage": integer(1, maximum=100),
                            },
                            ["enabled"],
                        ),
                        "metricsPort": PORT,
                        "podDisruptionBudget": PDB,
                    },
                    ["replicas", "metricsPort"],
                ),
                "aggregate": obj(
                    {
                        "replicas": integer(0),
                        "resources": RESOURCES,
                        "persistence": obj(
                            {"enabled": boolean(), "size": QUANTITY, "storageClassName": string()}, ["enabled", "size"]
                        ),
                        "webPort": PORT,
                        "bearerTokenSecret": SECRET_KEY,
                        "peerTokenSecret": SECRET_KEY,
                        "podDisruptionBudget": PDB,
                        "terminationGracePeriodSeconds": integer(0),
                    },
                    ["replicas", "webPort"],
                ),
                "notify": obj({"enabled": boolean(), "webhookSecret": SECRET_KEY, "resources": RESOURCES}, ["enabled"]),
                "serviceAccount": obj({"create": boolean(), "name": string(), "annotations": free_map()}, ["create"]),
                "podAnnotations": free_map(),
                "podLabels": free_map(),
                "nodeSelector": free_map(),
                "tolerations": {"type": "array"},
                "affinity": free_map(),
                "podSecurityContext": free_map(),
                "securityContext": free_map(),
                "monitoring": obj(
                    {
                        "serviceMonitor": obj(
                            {
                                "enabled": boolean(),
                                "interval": string(pattern=r"^[0-9]+(ms|s|m|h)$"),
                                "labels": free_map(),
                            },
                            ["enabled"],
                        ),
                        "prometheusRule": obj({"enabled": boolean(), "labels": free_map()}, ["enabled"]),
                        "dashboard": obj({"enabled": boolean(), "labels": free_map()}, ["enabled"]),
                    }
                ),
            },
            ["image", "kafka", "topics", "enrich", "aggregate"],
        ),
    }


def main() -> None:
    sys.stdout.write(json.dumps(schema(), indent=2) + "\n")


if __name__ == "__main__":
    main()
