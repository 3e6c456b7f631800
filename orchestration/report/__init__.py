"""What a run reports: metrics sinks and timers, curves and report.md, reasoning metrics."""
