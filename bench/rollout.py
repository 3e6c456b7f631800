"""Completion tokens/s: `RolloutActor` (a Ray actor, as in the system) vs bare vLLM `LLM.generate`.

The demo's sampling: 8 arithmetic prompts (tasks/arithmetic.py, chat template) × n=8,
temperature 0.7, max_tokens 32; fp32, enforce_eager, max_model_len 512, VLLM_CPU_KVCACHE_SPACE=1,
VLLM_CPU_OMP_THREADS_BIND=nobind for both (the actor gets the demo's 2 CPUs, so Ray gives it
OMP_NUM_THREADS=2, the bare engine's default here). The bare engine runs in this (the driver)
process with vLLM's defaults otherwise (no logprobs); a third engine call, bare with
`logprobs=0`, shows what asking for the sampled tokens' logprobs costs. The engines run one after
the other, never concurrently: each is warmed up once, then `--reps` rounds call them in turn;
medians of tokens/s. Prints one JSON line.

    .venv/bin/python bench/rollout.py            # --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

MODEL, MAX_MODEL_LEN, N, TEMPERATURE, MAX_TOKENS = "builtin:smollm2-135m", 512, 8, 0.7, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()

    import ray

    from actors.rollout import RolloutActor
    from actors.spec import EngineSpec
    from actors.types import Prompt, SamplingSpec
    from orchestration.cluster.placement import start_local_ray, worker_env
    from common.models import resolve_model_path
    from tasks.arithmetic import ArithmeticTask

    model = resolve_model_path(MODEL)
    task = ArithmeticTask(seed=0, min_operand=1, max_operand=20, ops="+-", test_size=64)
    prompts = [Prompt(p.id, p.prompt) for p in task.train_batch(0, args.prompts)]
    spec = SamplingSpec(n=N, temperature=TEMPERATURE, max_tokens=MAX_TOKENS)

    os.environ.pop("RAY_ADDRESS", None)
    start_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": worker_env()})
    try:
        actor = ray.remote(RolloutActor).options(num_cpus=2).remote(  # num_cpus: the demo's rollout_cpus
            EngineSpec(model, dtype="float32", seed=0, max_model_len=MAX_MODEL_LEN, max_prompt_tokens=128,
                       kv_cache_gb=1))
        ray.get(actor.ready.remote())

        def through_actor() -> int:
            groups = ray.get(actor.generate.remote(prompts, spec)).groups
            return sum(len(c.token_ids) for g in groups for c in g.completions)

        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=model, dtype="float32", seed=0, max_model_len=MAX_MODEL_LEN, enforce_eager=True)
        tok = llm.get_tokenizer()
        encoded = []
        for p in prompts:
            ids = tok.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=True)
            encoded.append(TokensPrompt(prompt_token_ids=list(ids["input_ids"] if hasattr(ids, "keys") else ids)))

        def bare(logprobs: int | None) -> int:
            params = SamplingParams(n=N, temperature=TEMPERATURE, max_tokens=MAX_TOKENS, logprobs=logprobs)
            outs = llm.generate(encoded, params, use_tqdm=False)
            return sum(len(c.token_ids) for o in outs for c in o.outputs)

        runs = {"rollout_actor": through_actor, "bare_llm": lambda: bare(None), "bare_llm_logprobs": lambda: bare(0)}
        rates: dict[str, list[float]] = {k: [] for k in runs}
        tokens: dict[str, list[int]] = {k: [] for k in runs}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.reps):
            for name, fn in runs.items():
                start = time.perf_counter()
                n = fn()
                rates[name].append(n / (time.perf_counter() - start))
                tokens[name].append(n)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(json.dumps({
            "bench": "rollout", "prompts": len(prompts), "n": N, "max_tokens": MAX_TOKENS, "reps": args.reps,
            "rollout_actor_tokens_per_s": round(med["rollout_actor"], 1),
            "bare_llm_tokens_per_s": round(med["bare_llm"], 1),
            "actor_over_bare": round(med["rollout_actor"] / med["bare_llm"], 3),
            "bare_llm_logprobs_tokens_per_s": round(med["bare_llm_logprobs"], 1),
            "actor_over_bare_logprobs": round(med["rollout_actor"] / med["bare_llm_logprobs"], 3),
            "tokens_per_s_each_rep": {k: [round(r, 1) for r in v] for k, v in rates.items()},
            "completion_tokens": tokens,
        }))
        ray.kill(actor)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
