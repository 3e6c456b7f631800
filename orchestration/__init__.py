"""The driver side: everything that runs in the `raygrpo` process and tells the actors what to do.

Rooms, each importing only the rooms above it (and the worker folders and `common/`):
    config/    the schema, its defaults and validation; the one table of stages
    report/    metrics sinks and timers, curves and report.md, reasoning metrics
    cluster/   Ray start-up and placement, the dry-run plan, actor pools, weight sync, the control
               channel, `launch` (starts and stops every actor kind for every stage)
    train/     the GRPO loop and what it uses between steps (producer, batching, evaluation,
               lifecycle, checkpoints)
    stages/    what each `stage=` runs (train and eval through train/, sft, distill, rejection
               sampling) and the pipeline of stages
Entry points at the root: main.py (the `raygrpo` command), preflight.py (checks before Hydra).
The worker folders (actors/, learner/, tasks/) and common/ never import orchestration/.
"""
