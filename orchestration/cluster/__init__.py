"""The cluster and the handles on it: Ray start-up and placement, the dry-run plan, actor pools,
the weight sync, the control channel, and `launch` (the one place that starts and stops actors)."""
