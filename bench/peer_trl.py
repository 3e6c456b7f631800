"""Peer benchmark: TRL's GRPOTrainer at raygrpo's demo settings, in seconds per step.

    .venv/bin/python bench/peer_trl.py --steps 5
    .venv/bin/python bench/peer_trl.py --steps 5 --raygrpo    # raygrpo's demo first, same steps, same run
    .venv/bin/python bench/peer_trl.py --steps 5 --raygrpo-steps-json runs/demo/metrics.jsonl
    .venv/bin/python bench/peer_trl.py --install-only    # make the peer venv now, time later

Run it with raygrpo's venv python from the repo root: that interpreter resolves
`builtin:smollm2-135m` to its fp32 safetensors directory (converted once into
`$RAYGRPO_CACHE/models`). The script then makes its own virtualenv
(`~/.cache/raygrpo-peer-trl/trl-<version>`, override with `--venv`), pip-installs TRL there (with
the same torch and transformers versions as the calling interpreter when they resolve, so the
model code is the same), and re-executes itself inside it. Nothing of raygrpo is installed in
that venv: it imports only `tasks/arithmetic.py` (stdlib) and `actors/rewards/math.py`
(math-verify, installed there) from this tree, so prompts and reward are raygrpo's own.

Settings (read from conf/experiment/demo.yaml where it sets them, else raygrpo's schema defaults):
SmolLM2-135M-Instruct in fp32 on CPU, P = 8 prompts × G = 8 completions per step (the arithmetic
task's training problems for steps 0, 1, …, chat template with add_generation_prompt, the tokenizer's
own default system message and nothing else), ≤ 32 new tokens, temperature 0.7, top_p 1, no top_k;
reward = raygrpo's `accuracy` (1 if the reply's final answer equals the answer); AdamW lr 1e-5
constant, betas (0.9, 0.999), no weight decay, grad clip 1.0; β = 0 (no reference model); TRL's
`loss_type="grpo"` (sequence mean of token means, raygrpo's `seq_mean_token_mean`), group-std
scaled advantages, clip ε 0.2; num_iterations 1 and steps_per_generation = gradient accumulation
steps, so each step generates the 64 completions once and makes one optimizer step on them;
no gradient checkpointing (the demo has none); 2 torch threads; generation with transformers.

A step is timed from the trainer's `on_step_begin` to its `on_step_end` (generation, reward,
forward/backward and the optimizer step). The first step is warm-up and is left out of the median.
Prints one JSON line on stdout; everything else goes to stderr. With `--raygrpo-steps-json`, it adds
raygrpo's median over the same step indices (`time/step` less `time/eval`) and raygrpo/TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_VERSION = "1.16.0"
INNER_ENV = "RAYGRPO_PEER_TRL_INNER"
THREADS = 2


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--steps", type=int, default=5, help="training steps to time (the first is warm-up)")
    ap.add_argument("--trl-version", default=TRL_VERSION)
    ap.add_argument("--venv", default=None, help="peer virtualenv (default ~/.cache/raygrpo-peer-trl/trl-<version>)")
    ap.add_argument("--model", default=None, help="HF directory of the model (default: raygrpo's builtin:smollm2-135m)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="completions per forward/backward (default: the whole batch of P×G; gradient "
                         "accumulation and steps_per_generation make up the rest)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raygrpo-steps-json", default=None,
                    help="raygrpo's metrics.jsonl: also print its median s/step and raygrpo/TRL")
    ap.add_argument("--raygrpo", action="store_true",
                    help="first run raygrpo's demo for the same steps (eval off) in this invocation and compare")
    ap.add_argument("--raygrpo-set", nargs="*", default=[], help="extra Hydra overrides for that raygrpo run")
    ap.add_argument("--install-only", action="store_true", help="make the peer venv, then stop")
    ap.add_argument("--install-s", type=float, default=None, help=argparse.SUPPRESS)  # passed to the inner run
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def demo_settings() -> dict:
    """The demo's numbers: conf/experiment/demo.yaml over raygrpo's schema defaults (orchestration/config/__init__.py)."""
    import yaml  # PyYAML: in both raygrpo's venv and the peer's (a datasets dependency)

    demo = yaml.safe_load((ROOT / "conf" / "experiment" / "demo.yaml").read_text())
    r, l, a, t = demo["rollout"], demo["learner"], demo.get("algo", {}), demo["task"]
    preset = next(d["override /reward"] for d in demo["defaults"] if isinstance(d, dict) and "override /reward" in d)
    functions = yaml.safe_load((ROOT / "conf" / "reward" / f"{preset}.yaml").read_text())["functions"]
    return {
        "model": demo["model"]["path"],
        "prompts_per_step": r["prompts_per_step"],
        "group_size": r["group_size"],
        "max_new_tokens": r["max_new_tokens"],
        "temperature": r["temperature"],
        "top_p": r.get("top_p", 1.0),
        "lr": float(l["lr"]),
        "grad_clip": float(l.get("grad_clip", 1.0)),
        "kl_coef": float(a.get("kl_coef", 0.0)),
        "clip_eps": float(a.get("clip_low", 0.2)),
        "task": {"seed": t.get("seed", 0), "min_operand": t["min_operand"], "max_operand": t["max_operand"],
                 "num_operands": t.get("num_operands", 2), "ops": t["ops"], "test_size": t["test_size"]},
        "reward": functions,
    }


# ---------------------------------------------------------------- outer: venv, install, re-exec

def outer(args: argparse.Namespace, argv: list[str]) -> None:
    from importlib import metadata

    venv = Path(args.venv or Path.home() / ".cache" / "raygrpo-peer-trl" / f"trl-{args.trl_version}").expanduser()
    py = venv / "bin" / "python"
    marker = venv / ".raygrpo-peer-installed"
    install_s = None
    if not marker.is_file():
        t0 = time.perf_counter()
        if not py.is_file():
            log(f"peer_trl: creating {venv}")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, stdout=sys.stderr)
        base = [f"trl=={args.trl_version}", "math-verify==0.9.0"]
        same = []  # the caller's torch and transformers, so both sides run the same model code
        for name in ("torch", "transformers"):
            try:
                same.append(f"{name}=={metadata.version(name)}")
            except metadata.PackageNotFoundError:
                pass
        pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
        cpu_torch = ["--index-url", "https://download.pytorch.org/whl/cpu", "torch"]
        # Same torch/transformers as the caller; else whatever resolves; else torch's CPU index first.
        for steps in ([[*base, *same]], [base], [cpu_torch, base]):
            for spec in steps:
                log(f"peer_trl: pip install {' '.join(spec)}")
                if subprocess.run([*pip, *spec], stdout=sys.stderr).returncode != 0:
                    break
            else:
                break
        else:
            sys.exit("peer_trl: pip install failed (see above)")
        install_s = time.perf_counter() - t0
        marker.write_text(json.dumps({"trl": args.trl_version, "install_s": install_s}) + "\n")
        log(f"peer_trl: installed in {install_s:.0f} s")
    if args.install_only:
        log(f"peer_trl: venv ready: {venv}")
        return

    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        try:
            from common.models import resolve_model_path
        except ImportError as e:
            sys.exit(f"peer_trl: cannot resolve {demo_settings()['model']} ({e}); run with raygrpo's "
                     f"venv python (.venv/bin/python) or pass --model DIR")
        model = resolve_model_path(demo_settings()["model"])
    if args.raygrpo and not args.raygrpo_steps_json:
        argv = [*argv, "--raygrpo-steps-json", run_raygrpo(args.steps, args.raygrpo_set)]
    env = dict(os.environ, **{INNER_ENV: "1"})
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(THREADS)
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", WANDB_DISABLED="true", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # nothing from the caller's environment in the peer's imports
    extra = ["--model", model] + (["--install-s", str(install_s)] if install_s is not None else [])
    os.execve(str(py), [str(py), str(Path(__file__).resolve()), *argv, *extra], env)


def run_raygrpo(steps: int, overrides: list[str]) -> str:
    """raygrpo's demo for `steps` steps without evaluation, here and now; returns its metrics.jsonl."""
    import tempfile

    out = Path(tempfile.mkdtemp(prefix="peer-trl-raygrpo-"))
    cmd = [sys.executable, "-m", "orchestration", "experiment=demo", f"steps={steps}", "eval.enabled=false",
           "logger.progress=false", "logger.wandb.mode=disabled", f"output_dir={out}", *overrides]
    log(f"peer_trl: {' '.join(cmd)}")
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr)
    return str(out / "metrics.jsonl")


# ---------------------------------------------------------------- inner: the TRL run

def raygrpo_median(path: str, steps: int) -> tuple[float, list[int]]:
    """raygrpo's median s/step over the steps TRL timed (1 … steps-1; step 0 when steps is 1): the
    same prompts, and replies of like length (they shorten as training goes on). A step's time is
    `time/step` less any `time/eval` (held-out evaluation is no part of a training step)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    times = {r["step"]: r["time/step"] - r.get("time/eval", 0.0) for r in rows if "time/step" in r}
    wanted = [i for i in (range(1, steps) if steps > 1 else [0]) if i in times]
    if not wanted:
        raise SystemExit(f"peer_trl: {path} has no time/step for steps {list(range(1, steps)) or [0]}")
    return statistics.median(times[i] for i in wanted), wanted


def load_raygrpo_reward(name: str):
    """raygrpo's reward function from actors/rewards/math.py, loaded by file path (the package's
    __init__ would pull in more than the peer venv has)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("raygrpo_math_rewards", ROOT / "actors" / "rewards" / "math.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def inner(args: argparse.Namespace) -> None:
    import contextlib

    import torch

    torch.set_num_threads(THREADS)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    import trl
    from trl import GRPOConfig, GRPOTrainer

    s = demo_settings()
    P, G = s["prompts_per_step"], s["group_size"]
    batch = P * G
    micro = args.micro_batch or batch
    if batch % micro:
        raise SystemExit(f"peer_trl: --micro-batch must divide {batch}")
    accum = batch // micro

    sys.path.insert(0, str(ROOT))
    from tasks.arithmetic import ArithmeticTask  # stdlib only

    task = ArithmeticTask(**s["task"])
    rows = [{"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer}
            for step in range(args.steps) for p in task.train_batch(step, P)]
    dataset = Dataset.from_list(rows)

    # The demo scores with accuracy alone (conf/reward/accuracy.yaml, weight 1).
    (reward_name, weight), = s["reward"].items()
    reward_fn = load_raygrpo_reward(reward_name)

    def accuracy(completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [weight * reward_fn(text, ans) for text, ans in zip(texts, answer)]

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    gen_times: list[float] = []  # seconds inside model.generate, per call
    generate = model.generate

    def timed_generate(*a, **k):
        t0 = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            gen_times.append(time.perf_counter() - t0)

    model.generate = timed_generate

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.steps: list[float] = []
            self.gen: list[float] = []
            self.logs: list[dict] = []

        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.n_gen = time.perf_counter(), len(gen_times)

        def on_step_end(self, a, state, control, **kw):
            self.steps.append(time.perf_counter() - self.t0)
            self.gen.append(sum(gen_times[self.n_gen:]))
            log(f"peer_trl: step {len(self.steps) - 1}: {self.steps[-1]:.2f} s (generate {self.gen[-1]:.2f} s)")

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.logs.append(logs)

    import tempfile

    out_dir = tempfile.mkdtemp(prefix="raygrpo-peer-trl-")
    config = GRPOConfig(
        output_dir=out_dir, seed=args.seed, max_steps=args.steps,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum, steps_per_generation=accum,
        num_generations=G, num_iterations=1, shuffle_dataset=False,
        max_completion_length=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"], top_k=0,
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=s["grad_clip"],
        beta=s["kl_coef"], loss_type="grpo", scale_rewards="group", epsilon=s["clip_eps"],
        mask_truncated_completions=False,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=config, train_dataset=dataset,
                          processing_class=tok, callbacks=[timer])
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs; stdout is for the result
        trainer.train()
    wall = time.perf_counter() - t0
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)

    timed = timer.steps[1:] or timer.steps
    gen = timer.gen[1:] or timer.gen
    result = {
        "peer": "trl", "version": trl.__version__, "steps": len(timer.steps),
        "s_per_step_median": round(statistics.median(timed), 3),
        "s_per_step": [round(x, 3) for x in timer.steps],
        "s_generate_median": round(statistics.median(gen), 3),
        "s_generate": [round(x, 3) for x in timer.gen],
        "train_wall_s": round(wall, 1),
        "reward_mean": [round(float(l["reward"]), 4) for l in timer.logs],
        "install_s": None if args.install_s is None else round(args.install_s, 1),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(),
        "settings": {
            "model": s["model"], "dtype": "float32", "device": "cpu",
            "prompts_per_step": P, "num_generations": G, "max_completion_length": s["max_new_tokens"],
            "temperature": s["temperature"], "top_p": s["top_p"], "top_k": 0, "lr": s["lr"],
            "max_grad_norm": s["grad_clip"], "beta": s["kl_coef"], "loss_type": "grpo", "epsilon": s["clip_eps"],
            "scale_rewards": "group", "num_iterations": 1, "per_device_train_batch_size": micro,
            "gradient_accumulation_steps": accum, "steps_per_generation": accum,
            "gradient_checkpointing": False, "optim": "adamw_torch", "reward": s["reward"],
            "generation": "transformers", "seed": args.seed,
        },
    }
    if args.raygrpo_steps_json:
        ray_median, ray_steps = raygrpo_median(args.raygrpo_steps_json, len(timer.steps))
        result["raygrpo_s_per_step_median"] = round(ray_median, 3)
        result["raygrpo_steps"] = ray_steps
        result["raygrpo_over_trl"] = round(ray_median / result["s_per_step_median"], 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    argv = sys.argv[1:]
    parsed = parse_args(argv)
    if os.environ.get(INNER_ENV) == "1":
        inner(parsed)
    else:
        outer(parsed, argv)
