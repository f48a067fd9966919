"""Kafka plumbing every worker shares: client options, the topics and their configs, dead letters, reading and
following a topic, sending in batches and committing, waiting before a retry. Imports only budgetflow.schemas
(docs/architecture.md, "Layers").
"""
