"""For development and measurement: the local broker (plain and secure), the demo, the shift simulation, the
benchmarks (docs/performance.md).
"""
