"""Operator tools: policy apply, the audit trail, adjustments and reports, reading back what the pipeline published,
the notifier (docs/operations.md, "Operator tools").
"""
