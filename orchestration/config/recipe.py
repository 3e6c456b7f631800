"""Configuration of the DeepSeek-R1 recipe's stages (`stage=sft|distill|rejection_sampling|pipeline`)
and of the reasoning metrics: fields, defaults and meaning, defined once here (part of `Config`).

Standard library and omegaconf only. The stages themselves are listed in `orchestration.config.stages`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from orchestration.config.stages import STAGES

PIPELINE_STAGES = tuple(name for name in STAGES if name != "pipeline")  # what a pipeline stage may run
REFLECTION_MARKERS = ("wait", "verify", "check again", "mistake", "let me check", "double-check", "re-check")  # reasoning.reflection_markers' default
STAGE_REF = "stage:"  # a pipeline setting `stage:<name>` is that stage's output (policy dir or data file)


@dataclass
class SFTConfig:
    train_files: list[str] = field(default_factory=list)
    """Supervised data, one prompt/response pair per row: `.jsonl`, `.json`, `.parquet` files or
    `save_to_disk` directories (read by the same loader as `data.*`; bad rows skipped and counted).
    In a pipeline, `stage:<name>` is a rejection-sampling stage's output. Empty: the arithmetic
    task writes `worked_solutions` worked solutions in the think format (cold start)."""
    val_files: list[str] = field(default_factory=list)
    """Held-out rows for the held-out loss; empty: `val_fraction` of the training rows."""
    prompt_key: str = "prompt"
    """Column of the prompt: a string (wrapped in the chat template with `task.system_prompt`, as
    the rollout engines wrap it) or a list of chat messages."""
    response_key: str = "response"
    """Column of the response; the loss is on its tokens (and the end-of-sequence token) only."""
    val_fraction: float = 0.1
    """Share of the training rows held out when `val_files` is empty (at least one row)."""
    epochs: int = 2
    """Passes over the training rows (an sft stage ignores `steps`)."""
    batch_size: int = 16
    """Sequences per optimizer step; micro-batches within it follow `learner.micro_batch_tokens`."""
    eval_every_n_steps: int = 10
    """Held-out loss every n optimizer steps, and at the start and the end (0: start and end only)."""
    worked_solutions: int = 256
    """Worked solutions the arithmetic task writes when `train_files` is empty."""


@dataclass
class DistillConfig:
    student_layers: int = 0
    """0: the student is `model.path` as it is (a smaller model: any tokenizer, the text is
    re-tokenized). N > 0: the student is `model.path`'s architecture and tokenizer cut to N decoder
    layers, initialised from N evenly spaced layers of it with its embeddings and head (as
    DistilBERT initialises from its teacher), written to `<output_dir>/student/` first."""


@dataclass
class RejectionConfig:
    num_prompts: int = 128
    """Training prompts to sample: the first of the task's training stream (the run's order)."""
    samples_per_prompt: int = 8
    """K completions per prompt, at rollout.temperature / top_p and up to rollout.max_new_tokens."""
    max_per_prompt: int = 4
    """Distinct accepted completions kept per prompt (0: all of them)."""
    min_parts: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0})
    """Reward part → the least value a kept completion scores in it, e.g. `{accuracy: 1,
    think_format: 1, language_consistency: 0.95}`. Every name must be in reward.functions."""
    min_tokens: int = 1
    """Shortest kept completion, in tokens."""
    max_tokens: int = 0
    """Longest kept completion, in tokens (0: rollout.max_new_tokens)."""
    allow_truncated: bool = False
    """Also keep replies cut at rollout.max_new_tokens (R1 keeps finished replies only)."""
    max_repetition: float = 0.2
    """Highest n-gram repetition rate (1 − distinct 4-grams / 4-grams) of a kept completion."""


@dataclass
class StageSpec:
    name: str = MISSING
    """The stage's directory under output_dir, and how later stages refer to it (`stage:<name>`)."""
    stage: str = MISSING
    """What it runs: sft, train, rejection_sampling, distill or eval."""
    set: dict[str, Any] = field(default_factory=dict)
    """Settings of this stage over the pipeline's own, by dotted key (`{learner.lr: 5e-5,
    sft.train_files: [stage:sample]}`). A value `stage:<name>` is that earlier stage's output: its
    policy directory, or for rejection_sampling its data file."""


@dataclass
class PipelineConfig:
    stages: list[StageSpec] = field(default_factory=list)
    """The stages, in order. Each writes under `<output_dir>/<name>/` (a policy at `policy/`); a
    stage whose directory holds `DONE.json` is finished and not run again."""
    evaluate: bool = True
    """Evaluate the starting model and every stage's policy on the held-out set (`eval.*`), into
    one table at the end (`<output_dir>/report.md`): accuracy, format rate, mean length."""


@dataclass
class ReasoningConfig:
    open_tag: str = "<think>"
    """Opening tag of the reasoning block: of the `think_format` and `language_consistency`
    rewards, the `reasoning/*` metrics and the cold-start worked solutions."""
    close_tag: str = "</think>"
    """Closing tag of the reasoning block."""
    language: str = "latin"
    """Target script of `language_consistency`: latin, cyrillic, greek or cjk."""
    reflection_markers: list[str] = field(default_factory=lambda: list(REFLECTION_MARKERS))
    """Phrases counted as reflection (`reasoning/reflection_rate`), case-insensitive, whole words."""


def reward_settings(cfg: Any) -> dict[str, dict[str, str]]:
    """Settings of the built-ins made by a factory (see `actors.rewards.FACTORIES`): the reasoning
    rewards from `reasoning.*`, `code_tests` from `reward.code`."""
    r = cfg.reasoning
    return {"think_format": {"open": r.open_tag, "close": r.close_tag},
            "language_consistency": {"script": r.language, "open": r.open_tag, "close": r.close_tag},
            "code_tests": {"sandbox": cfg.reward.code.sandbox}}


def validate_recipe(cfg: Any, check: Any) -> None:
    """The stage fields; `check(ok, message)` raises ConfigError."""
    s, r, p = cfg.sft, cfg.rejection, cfg.pipeline
    check(cfg.stage in STAGES, f"stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}")
    check(0 < s.val_fraction < 1, f"sft.val_fraction must be in (0, 1), got {s.val_fraction}")
    check(s.epochs >= 1, f"sft.epochs must be >= 1, got {s.epochs}")
    check(s.batch_size >= 1, f"sft.batch_size must be >= 1, got {s.batch_size}")
    check(s.eval_every_n_steps >= 0, f"sft.eval_every_n_steps must be >= 0, got {s.eval_every_n_steps}")
    check(s.worked_solutions >= 2, f"sft.worked_solutions must be >= 2, got {s.worked_solutions}")
    check(bool(s.prompt_key) and bool(s.response_key), "sft.prompt_key and sft.response_key must not be empty")
    check(cfg.distill.student_layers >= 0, f"distill.student_layers must be >= 0, got {cfg.distill.student_layers}")
    check(r.num_prompts >= 1, f"rejection.num_prompts must be >= 1, got {r.num_prompts}")
    check(r.samples_per_prompt >= 1, f"rejection.samples_per_prompt must be >= 1, got {r.samples_per_prompt}")
    check(r.max_per_prompt >= 0, f"rejection.max_per_prompt must be >= 0, got {r.max_per_prompt}")
    check(0 <= r.max_repetition <= 1, f"rejection.max_repetition must be in [0, 1], got {r.max_repetition}")
    check(r.max_tokens == 0 or r.max_tokens >= r.min_tokens,
          f"rejection.max_tokens ({r.max_tokens}) must be 0 or >= rejection.min_tokens ({r.min_tokens})")
    if cfg.stage == "rejection_sampling":
        missing = [k for k in r.min_parts if k not in cfg.reward.functions]
        check(not missing, f"rejection.min_parts names {', '.join(missing)}, not in reward.functions "
                           f"({', '.join(cfg.reward.functions)}): add it there (weight 0 scores it without "
                           f"changing the reward)")
    check(bool(cfg.reasoning.open_tag) and bool(cfg.reasoning.close_tag)
          and cfg.reasoning.open_tag != cfg.reasoning.close_tag,
          "reasoning.open_tag and reasoning.close_tag must be two different non-empty strings")
    if cfg.stage == "pipeline":
        check(len(p.stages) > 0, "stage=pipeline needs pipeline.stages (see conf/experiment/r1_cpu.yaml)")
        names: list[str] = []
        for spec in p.stages:
            check(spec.stage in PIPELINE_STAGES, f"pipeline stage {spec.name!r}: stage must be one of "
                                                 f"{', '.join(PIPELINE_STAGES)}, got {spec.stage!r}")
            check(bool(spec.name) and "/" not in spec.name and spec.name not in names,
                  f"pipeline stage names must be distinct directory names, got {spec.name!r}")
            for key, value in spec.set.items():
                for ref in refs_in(value):
                    check(ref in names, f"pipeline stage {spec.name!r}: {key} refers to {STAGE_REF}{ref}, "
                                        f"which is not an earlier stage")
            names.append(spec.name)


def refs_in(value: Any) -> list[str]:
    """The stage names a setting refers to (`stage:<name>`, alone or in a list)."""
    items = [value] if isinstance(value, str) or not hasattr(value, "__iter__") else list(value)
    return [v[len(STAGE_REF):] for v in items if isinstance(v, str) and v.startswith(STAGE_REF)]
