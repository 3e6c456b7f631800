"""Where prompts and answers come from: the arithmetic generator, or the user's data files."""

from __future__ import annotations

from typing import Any

from tasks.base import Problem, Task


def make_task(cfg: Any) -> Task:
    """The run's task: `data.*` files when any are given (an eval stage loads only val_files),
    else reasoning-gym (`task.name=reasoning_gym`), generated word problems (`task.name=word_problems`)
    or the arithmetic generator (`task.*`). Raises DataError (a ConfigError) for unusable data."""
    d = cfg.data
    train_files = list(d.train_files) if cfg.stage in ("train", "rejection_sampling") else []
    if train_files or d.val_files:
        from tasks.files import FileTask

        return FileTask(train_files, list(d.val_files), prompt_key=d.prompt_key, answer_key=d.answer_key,
                        seed=cfg.seed, batch_size=cfg.rollout.prompts_per_step, epochs=d.epochs, shuffle=d.shuffle)
    t = cfg.task
    if t.name == "reasoning_gym":
        from tasks.gym import GymTask

        return GymTask(t.gym_dataset, seed=t.seed, test_size=t.test_size)
    if t.name == "word_problems":
        from tasks.word_problems import WordProblemTask

        return WordProblemTask(seed=t.seed, test_size=t.test_size)
    from tasks.arithmetic import ArithmeticTask

    return ArithmeticTask(seed=t.seed, min_operand=t.min_operand, max_operand=t.max_operand,
                          num_operands=t.num_operands, ops=t.ops, test_size=t.test_size, instruction=t.instruction)


__all__ = ["Problem", "Task", "make_task"]
