"""The stages `stage=` may name, in one table: the actors each places and what it hands on.

| stage                | actors                   | reads                      | writes (under output_dir)      |
|----------------------|--------------------------|----------------------------|--------------------------------|
| `train` (GRPO)       | rollout, reward, learner | model.path, task or data.* | policy/, metrics, checkpoints  |
| `eval`               | rollout                  | model.path, test split     | eval.json                      |
| `sft`                | learner                  | model.path, sft.* rows     | policy/, sft.json, train.jsonl |
| `distill`            | learner                  | a student, sft.* rows      | student/, policy/, sft.json    |
| `rejection_sampling` | rollout, reward          | model.path, task or data.* | data.jsonl, rejection.json     |
| `pipeline`           | (its stages')            | pipeline.stages            | one directory per stage        |

Everything else is derived from `STAGES`: validation (`orchestration.config.recipe`), the actors a
stage places (`orchestration.stages`), the dry run's plan (`orchestration.cluster.plan`) and what
a pipeline's `stage:<name>` means (`orchestration.stages.pipeline`). What each stage runs stays
with its code in `orchestration/stages/` and `orchestration/train/`. Standard library only, so
every layer from config up may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("rollout", "learner", "reward")  # every actor kind, in the order placement reserves them
POLICY = "policy"  # the output of a stage that trains: a Hugging Face directory


@dataclass(frozen=True)
class Stage:
    name: str
    """What `stage=` (or a pipeline stage's `stage:`) says."""
    roles: tuple[str, ...]
    """The actor kinds it places, in the order they are placed (a pipeline places none itself:
    each of its stages places its own)."""
    output: str | None = None
    """What it hands on, relative to its output_dir: what a pipeline's `stage:<name>` becomes
    (None: nothing to refer to)."""

    @property
    def trains(self) -> bool:
        """It writes a policy (a pipeline with `pipeline.evaluate` evaluates it)."""
        return self.output == POLICY


STAGES = {s.name: s for s in (
    Stage("train", ("rollout", "reward", "learner"), POLICY),
    Stage("eval", ("rollout",)),
    Stage("sft", ("learner",), POLICY),
    Stage("distill", ("learner",), POLICY),
    Stage("rejection_sampling", ("rollout", "reward"), "data.jsonl"),
    Stage("pipeline", ()),
)}
"""Every stage by name, in the order messages list them."""
