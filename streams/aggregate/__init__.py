"""The aggregate stage: the exact ledger of each partition it owns (RocksDB state and its changelog), recovery,
the statuses it publishes, its stats API and gauges (docs/architecture.md, "Exactly once, and how it is proven").
"""
