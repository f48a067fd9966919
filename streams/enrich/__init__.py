"""The enrich stage: requests and usage become priced ledger entries, one per budget charged, exactly once
(docs/architecture.md, "The flow of events").
"""
