"""The GRPO loop (`loop.train`, top to bottom) and what it uses: producing a step's data, batching,
held-out evaluation, the run's life between steps, checkpoints."""
