"""Stages `sft` and `distill`: supervised fine-tuning on the learner group (same FSDP2 worker as GRPO).

`sft` trains `model.path` on prompt/response rows (`sft.*`; cold start: the arithmetic task's
worked solutions in the think format) with the token-mean NLL of the response tokens
(`learner.objectives.SFTObjective`), micro-batched by `learner.micro_batch_tokens`, and logs the
held-out loss. `distill` is the same on a student: `model.path` itself (a smaller model; its own
tokenizer re-tokenizes the text) or, with `distill.student_layers`, a cut-down copy of it. Both
write `<output_dir>/policy/` (an HF directory), `metrics.jsonl`, `curves.png` and `sft.json`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestration.config import ConfigError
from orchestration.stages.sft_data import (Encoded, Example, encode, epoch_batches, load_examples, nll, split,
                                           write_jsonl)

log = logging.getLogger("raygrpo")


@dataclass
class SFTData:
    train: list[Example]
    val: list[Example]
    skipped: int  # unparsable rows
    model_path: str  # the model to train (a distill stage's student)


def prepare(cfg: Any) -> SFTData:
    """Read (or, for a cold start, write) the rows and build a distill stage's student; before Ray
    starts, so unusable data stops the stage with one line."""
    s, out = cfg.sft, Path(cfg.output_dir)
    if s.train_files:
        train, skipped = load_examples(list(s.train_files), s.prompt_key, s.response_key)
    else:
        train, skipped = cold_start_examples(cfg, out / "train.jsonl"), 0
    if s.val_files:
        val, bad = load_examples(list(s.val_files), s.prompt_key, s.response_key)
        skipped += bad
    else:
        if len(train) < 2:
            raise ConfigError(f"sft needs at least 2 rows to hold one out, got {len(train)} (or give sft.val_files)")
        train, val = split(train, s.val_fraction, cfg.seed)
    model_path = cfg.model.path
    if cfg.stage == "distill" and cfg.distill.student_layers and not cfg.dry_run:
        from common.models import build_student

        model_path = build_student(cfg.model.path, out / "student", cfg.distill.student_layers)
    return SFTData(train, val, skipped, model_path)


def cold_start_examples(cfg: Any, path: Path) -> list[Example]:
    """The arithmetic task's worked solutions (`sft.worked_solutions` rows), also written to `path`:
    calculator traces when the environment has the `calculator` tool, else think-format solutions."""
    from tasks import make_task
    from tasks.arithmetic import ArithmeticTask
    from tasks.worked import tool_rows, worked_rows

    task = make_task(cfg)
    if not isinstance(task, ArithmeticTask):
        raise ConfigError("sft.train_files is empty: give prompt/response files (worked solutions are "
                          "written only for the arithmetic task)")
    if cfg.env.name == "tools" and "calculator" in cfg.env.tools:
        rows = tool_rows(task, cfg.sft.worked_solutions, cfg.seed)
    else:
        rows = worked_rows(task, cfg.sft.worked_solutions, cfg.seed, cfg.reasoning.open_tag, cfg.reasoning.close_tag)
    if not cfg.dry_run:
        write_jsonl(rows, path)
    return [Example(r["prompt"], r["response"], f"{path.name}:{i + 1}") for i, r in enumerate(rows)]


def run_sft(cfg: Any, placement: Any, data: SFTData) -> Path:
    """Train, log held-out loss, save the policy; returns the policy directory."""
    from learner.batch import pad_to_multiple
    from learner.objectives import SFTObjective
    from orchestration.cluster.launch import Actors, learner_spec, start_learner
    from orchestration.report import summary
    from orchestration.report.metrics import RunLogger
    from orchestration.train.checkpoint import config_dict

    start, out = time.time(), Path(cfg.output_dir)
    train, val = encode_both(cfg, data)
    plan = epoch_batches(len(train), cfg.sft.batch_size, cfg.sft.epochs, cfg.seed)
    spec = learner_spec(cfg, data.model_path, SFTObjective(), len(plan))
    actors = Actors(learner=start_learner(cfg, placement, spec))
    learner = actors.learner
    logger = RunLogger(cfg.output_dir, config_dict(cfg), cfg.logger.wandb, len(plan), cfg.logger.progress,
                       desc=cfg.stage)
    held_out = lambda: nll(learner.logprobs(val.batch(list(range(len(val))))), val.masks)  # noqa: E731
    every = cfg.sft.eval_every_n_steps
    try:
        first = held_out()
        last = first
        stats = {"sft/train_rows": float(len(train)), "sft/val_rows": float(len(val)),
                 "sft/skipped_rows": float(data.skipped), "sft/too_long_rows": float(train.too_long + val.too_long)}
        for step, rows in enumerate(plan):
            batch, _ = pad_to_multiple(train.batch(rows), cfg.learner.num_ranks)
            metrics = {f"learner/{k}": v for k, v in learner.train_step(batch).items()}
            if step == len(plan) - 1 or (every and (step + 1) % every == 0):
                last = metrics["sft/val_loss"] = held_out()
            if step == 0:
                metrics.update({**stats, "sft/val_loss_start": first})
            logger.log(step, {"sft/train_loss": metrics["learner/nll"], **metrics})
        learner.save_pretrained(str((out / "policy").resolve()), merge=cfg.export.merge)  # LoRA: adapter (+ merged)
    finally:
        logger.close()
        actors.shutdown()
    record = {"model": data.model_path, "steps": len(plan), "val_loss_start": first, "val_loss_end": last,
              **{k.removeprefix("sft/"): v for k, v in stats.items()}, "wall_s": time.time() - start}
    (out / "sft.json").write_text(json.dumps(record, indent=1))
    summary.plot_curves(summary.load_metrics(out), out / "curves.png", summary.SFT_PANELS)
    log.info("%s: held-out loss %.4f -> %.4f over %d steps", cfg.stage, first, last, len(plan))
    return out / "policy"


def encode_both(cfg: Any, data: SFTData) -> tuple[Encoded, Encoded]:
    """Both splits in the trained model's tokens; rows over `model.max_model_len` skipped and counted."""
    from transformers import AutoTokenizer

    from common.models import resolve_model_path
    from envs import make_env
    from orchestration.cluster.launch import env_spec

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(data.model_path))
    limit, tools = cfg.model.max_model_len, make_env(env_spec(cfg)).tools()  # prompts as the engines render them
    train = encode(data.train, tokenizer, cfg.task.system_prompt, limit, tools)
    val = encode(data.val, tokenizer, cfg.task.system_prompt, limit, tools)
    if not len(train) or not len(val):
        raise ConfigError(f"no SFT row fits model.max_model_len={limit} tokens "
                          f"({train.too_long + val.too_long} rows longer)")
    if train.too_long + val.too_long:
        log.warning("sft: skipped %d rows longer than model.max_model_len=%d", train.too_long + val.too_long, limit)
    return train, val
