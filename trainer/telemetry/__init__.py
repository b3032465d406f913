"""What a run reports: the typed step record (`records`), the log line and metrics.jsonl (`progress`),
Prometheus (`metrics`), experiment trackers (`tracking`) and sampled completions (`completions`). Nothing
here changes training.
"""
