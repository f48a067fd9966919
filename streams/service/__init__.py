"""A worker as a process: its life cycle and exit codes, HTTP (serve an app, /metrics, /healthz, credentials),
the metric families, named crash points, spawning workers as child processes.
"""
