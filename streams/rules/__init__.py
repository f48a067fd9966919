"""The rules the workers and the view apply: the clock, the status rules (thresholds, hysteresis, rank, utilization),
which budgets a request is charged to (scopes and the implied ``global``), the forecast, the policies as read from
their topic.
"""
