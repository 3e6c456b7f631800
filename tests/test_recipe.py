"""The R1 recipe's pieces, without Ray: worked solutions, SFT data and its loss mask, the rejection
rules (hand-made replies), the distillation student, the pipeline's stage configs."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from actors.rewards.math import accuracy
from actors.rewards.reasoning import think_format
from learner.batch import pad
from learner.objectives import Micro, SFTObjective
from orchestration.config import ConfigError, validate
from orchestration.stages.rejection import Candidate, Rules, select, verdict
from orchestration.stages.sft_data import Example, encode, epoch_batches, load_examples, nll, split
from tasks.arithmetic import ArithmeticTask, evaluate
from tasks.worked import steps, tool_rows, worked_rows, worked_solution

from tests.test_config import make_cfg

# --------------------------------------------------------------------------- worked solutions


@pytest.mark.parametrize("operands, ops", [([12, 7], ["+"]), ([3, 4, 5], ["*", "-"]), ([2, 3, 4, 5], ["+", "*", "*"]),
                                           ([9, 0], ["*"]), ([5, 8, 2], ["-", "+"])])
def test_worked_solution_steps_reach_the_answer_in_the_think_format(operands, ops):
    work = steps(operands, ops)
    assert work[-1][3] == evaluate(operands, ops)
    for op, a, b, c in work:  # every step is true arithmetic
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op]
    for seed in range(6):
        text = worked_solution(operands, ops, random.Random(seed))
        assert think_format(text, "") == 1.0
        assert accuracy(text, str(evaluate(operands, ops))) == 1.0


def test_worked_rows_are_seeded_varied_and_from_training_problems():
    task = ArithmeticTask(test_size=16)
    rows = worked_rows(task, 40, seed=1)
    assert rows == worked_rows(task, 40, seed=1)
    assert len({r["response"].split("\n")[1].split()[1] for r in rows}) > 1  # more than one phrasing
    test_prompts = {p.prompt for p in task.test_set()}
    assert all(r["prompt"] not in test_prompts for r in rows)
    assert all(accuracy(r["response"], r["answer"]) == 1.0 for r in rows)


# --------------------------------------------------------------------------- SFT data


def test_sft_loss_is_on_response_tokens_only():
    from common.models import byte_tokenizer

    tok = byte_tokenizer()  # no chat template: the prompt is its raw bytes
    enc = encode([Example("What is 2 + 2?", "<think>2 plus 2 is 4</think>4"), Example("Hi", "ok")], tok, "", 512)
    assert len(enc.prompt_ids[0]) == len("What is 2 + 2?")  # one token per byte
    assert enc.response_ids[1][-1] == tok.eos_token_id
    padded = pad(enc.batch([0, 1]), tok.pad_token_id, "cpu")
    for row in range(2):
        mask = padded.mask[row] > 0
        assert int(mask.sum()) == len(enc.response_ids[row])  # no prompt token and no padding in the loss
        assert padded.targets[row][mask].tolist() == enc.response_ids[row]
    # The objective: mean NLL over the masked tokens; prompt-window values do not move it.
    logp = torch.full(padded.mask.shape, -50.0)
    logp[padded.mask > 0] = -1.0
    n = int(padded.mask.sum())
    loss, _ = SFTObjective()(Micro(logp, logp, padded.mask, padded.advantages, None, None, n, 2))
    assert float(loss) == pytest.approx(1.0)


def test_sft_rows_too_long_are_skipped_and_counted():
    from common.models import byte_tokenizer

    enc = encode([Example("a" * 10, "b" * 10), Example("a" * 100, "b")], byte_tokenizer(), "", 50)
    assert (len(enc), enc.too_long) == (1, 1)


def test_split_and_epoch_batches():
    examples = [Example(f"p{i}", f"r{i}") for i in range(20)]
    train, val = split(examples, 0.1, seed=3)
    assert (len(train), len(val)) == (18, 2) and not set(train) & set(val)
    assert split(examples, 0.1, seed=3) == (train, val)
    plan = epoch_batches(10, 4, 2, seed=0)
    assert [len(b) for b in plan] == [4, 4, 2, 4, 4, 2]
    assert sorted(i for b in plan[:3] for i in b) == list(range(10)) == sorted(i for b in plan[3:] for i in b)
    assert plan[:3] != plan[3:]  # a fresh order each epoch
    assert nll([[-1.0, -3.0], [-2.0]]) == pytest.approx(2.0)


def test_sft_rows_load_with_bad_rows_counted(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\nnot json\n" + json.dumps({"prompt": "q2"}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "q3"}], "response": "a3"}) + "\n")
    examples, skipped = load_examples([str(path)], "prompt", "response")
    assert [e.response for e in examples] == ["a", "a3"] and skipped == 2


# --------------------------------------------------------------------------- tool-using traces


def _tool_task():
    return ArithmeticTask(min_operand=2, max_operand=999, num_operands=3, ops="+-*", test_size=16)


def test_tool_rows_call_the_calculator_with_the_question_and_answer_with_its_result():
    from envs.tools import parse_calls

    task = _tool_task()
    rows = tool_rows(task, 30, seed=2)
    assert rows == tool_rows(task, 30, seed=2)
    assert {p.prompt for p in task.test_set()}.isdisjoint(r["prompt"] for r in rows)
    assert len({r["response"][2]["content"].split()[0] for r in rows}) > 1  # more than one phrasing
    for r in rows:
        call, tool, reply = r["response"]
        (name, args), = parse_calls(call["content"])[0]
        assert (name, call["role"], tool["role"], tool["content"]) == ("calculator", "assistant", "tool", r["answer"])
        assert args["expression"] in r["prompt"]
        assert accuracy(reply["content"], r["answer"]) == 1.0


class Scripted:
    """A stand-in engine that answers turn k of every request with `replies[k]` (closed)."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.queue, self.prompts = tok, replies, {}, []

    def add_request(self, request_id, prompt, params):
        self.queue[request_id] = len(self.prompts)
        self.prompts.append(list(prompt["prompt_token_ids"]))

    def step(self):
        outs = []
        for rid, k in self.queue.items():
            text = self.replies[k]
            ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            outs.append(SimpleNamespace(request_id=rid, finished=True, outputs=[SimpleNamespace(
                token_ids=ids, text=text, finish_reason="stop",
                logprobs=[{t: SimpleNamespace(logprob=-0.1)} for t in ids])]))
        self.queue.clear()
        return outs


def test_a_tool_trace_is_encoded_exactly_as_a_multi_turn_rollout_lays_it_out():
    """SFT on a trace teaches the very ids and mask GRPO later samples and trains on: the same
    prompt (tools rendered), replies closed by the end-of-turn token, the tool's turn as a delta."""
    from actors import multiturn
    from actors.types import Prompt, SamplingSpec
    from common.models import byte_tokenizer
    from envs.tools import ToolEnv, resolve_tool
    from orchestration.stages.sft_data import encode_chat

    tok, row = byte_tokenizer(), tool_rows(_tool_task(), 1)[0]
    env = ToolEnv([resolve_tool("calculator")], max_turns=3)
    prompt, response, mask = encode_chat(tok, [{"role": "user", "content": row["prompt"]}], row["response"],
                                         env.tools())
    engine = Scripted(tok, [m["content"] for m in row["response"] if m["role"] == "assistant"])
    item = (Prompt("p", row["prompt"]), prompt, SamplingSpec(n=1, max_tokens=200))
    ids = iter(range(100))
    (group,) = multiturn.run(engine, tok, env, [item], 0, lambda spec, m, seed: None,
                             multiturn.Limits(3, 2000, 4000), lambda: f"r{next(ids)}", {tok.eos_token_id})
    c = group.completions[0]
    assert c.info["tool_calls"] == 1 and c.finish_reason == "stop"
    assert (c.token_ids, c.mask) == (response, mask)
    assert 0 < sum(mask) < len(mask) and "calculator" in tok.decode(prompt)
    enc = encode([Example(row["prompt"], row["response"])], tok, "", 4000, env.tools())
    assert (enc.prompt_ids, enc.response_ids, enc.masks) == ([prompt], [response], [mask])


def test_the_cold_start_writes_tool_traces_when_the_policy_has_the_calculator(tmp_path):
    from orchestration.stages.sft import cold_start_examples

    tools = cold_start_examples(make_cfg("experiment=tools_cpu", "dry_run=true"), tmp_path / "t.jsonl")
    think = cold_start_examples(make_cfg("experiment=r1_cpu", "dry_run=true"), tmp_path / "r.jsonl")
    assert len(tools) == 16 and all(ex.response[0]["content"].startswith("<tool_call>") for ex in tools)
    assert all(isinstance(ex.response, str) and "<think>" in ex.response for ex in think)


def test_sft_on_a_trace_trains_the_replies_not_the_tools_answer():
    from common.models import byte_tokenizer
    from envs.tools import resolve_tool

    tok, row = byte_tokenizer(), tool_rows(_tool_task(), 1)[0]
    enc = encode([Example(row["prompt"], row["response"]), Example("Hi", "ok")], tok, "", 4000,
                 [resolve_tool("calculator").schema])
    assert enc.masks[1] == [1] * len(enc.response_ids[1])  # a plain row in the same batch: all its tokens
    padded = pad(enc.batch([0, 1]), tok.pad_token_id, "cpu")
    trained = padded.targets[0][padded.mask[0] > 0].tolist()
    assert trained == [t for t, m in zip(enc.response_ids[0], enc.masks[0]) if m]
    replies = [m["content"] for m in row["response"] if m["role"] == "assistant"]
    assert tok.decode(trained) == "".join(r + tok.eos_token for r in replies)  # the tool's turn is not in it


def test_held_out_loss_counts_the_policys_tokens_only():
    assert nll([[-1.0, -9.0, -3.0]], [[1, 0, 1]]) == pytest.approx(2.0)
    assert nll([[-1.0, -9.0, -3.0]]) == pytest.approx(13 / 3)


def test_tool_metrics_of_evaluation():
    from orchestration.train.evaluation import tool_metrics

    assert tool_metrics([{}, {}]) == {}  # no tools: no columns
    out = tool_metrics([{"tool_calls": 2.0, "tool_malformed": 1.0}, {"tool_calls": 0.0}, {"tool_calls": 1.0}])
    assert out == {"eval/tool_call_rate": pytest.approx(2 / 3), "eval/well_formed_rate": pytest.approx(3 / 4)}


# --------------------------------------------------------------------------- rejection sampling


def cand(text="<think>x</think>4", prompt="p", reward=1.0, finish="stop", tokens=10, **parts):
    return Candidate(prompt, "q", "4", text, tokens, finish, reward, {"accuracy": 1.0, "think_format": 1.0, **parts})


def test_rejection_keeps_exactly_what_the_rules_accept():
    rules = Rules({"accuracy": 1.0, "think_format": 1.0, "language_consistency": 0.9}, min_tokens=3, max_tokens=40,
                  max_repetition=0.2, max_per_prompt=2)
    good = cand(language_consistency=1.0)
    cases = {
        "reward_failed": cand(reward=None, language_consistency=1.0),
        "truncated": cand(finish="length", language_consistency=1.0),
        "too_short": cand(tokens=2, language_consistency=1.0),
        "too_long": cand(tokens=41, language_consistency=1.0),
        "accuracy_below_1": cand(accuracy=0.0, language_consistency=1.0),
        "think_format_below_1": cand(think_format=0.0, language_consistency=1.0),
        "language_consistency_below_0.9": cand(language_consistency=0.5),
        "repetition": cand(text="<think>" + "a b c d " * 10 + "</think>4", language_consistency=1.0),
    }
    assert verdict(good, rules) == ""
    for reason, c in cases.items():
        assert verdict(c, rules) == reason
    second = cand(text="<think>y</think>4", language_consistency=1.0)
    third = cand(text="<think>z</think>4", language_consistency=1.0)
    other = cand(prompt="p2", language_consistency=1.0)
    dup = cand(text=" <think>x</think>\n4 ", language_consistency=1.0)  # same reply up to whitespace
    kept, reasons = select([good, *cases.values(), dup, second, third, other], rules)
    assert kept == [good, second, other]
    assert reasons == {**{r: 1 for r in cases}, "duplicate": 1, "over_max_per_prompt": 1}
    assert verdict(cand(finish="length", language_consistency=1.0),
                   Rules({}, allow_truncated=True)) == ""  # truncated replies only when allowed


# --------------------------------------------------------------------------- distillation student


def test_student_keeps_evenly_spaced_teacher_layers(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from common.models import build_student, student_layers

    assert student_layers(30, 2) == [0, 29] and student_layers(30, 4) == [0, 10, 19, 29] and student_layers(5, 1) == [0]
    path = build_student(tiny_model, tmp_path / "student", 1)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model)
    student = AutoModelForCausalLM.from_pretrained(path)
    assert student.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert (tmp_path / "student" / "tokenizer.json").is_file()
    with pytest.raises(ConfigError, match="student_layers must be in"):
        build_student(tiny_model, tmp_path / "s2", 2)


# --------------------------------------------------------------------------- pipeline configs


def test_pipeline_resolves_stage_outputs_and_adds_evaluations(tmp_path, cache_dir):
    from orchestration.stages.pipeline import stage_configs

    cfg = make_cfg("experiment=r1_smoke", f"output_dir={tmp_path}")
    configs = dict(stage_configs(cfg))
    assert list(configs) == ["start", "cold_start", "cold_start/eval", "grpo", "grpo/eval", "sample", "distill",
                             "distill/eval"]
    assert configs["grpo"].model.path == str(tmp_path / "cold_start" / "policy")
    assert configs["grpo"].steps == 2 and configs["grpo"].stage == "train" and configs["grpo"].resume == "never"
    assert configs["sample"].model.path == str(tmp_path / "grpo" / "policy")
    assert list(configs["distill"].sft.train_files) == [str(tmp_path / "sample" / "data.jsonl")]
    assert configs["distill/eval"].model.path == str(tmp_path / "distill" / "policy")
    assert configs["start"].model.path == "builtin:tiny-qwen2"
    assert configs["cold_start"].output_dir == str(tmp_path / "cold_start")
    (tmp_path / "grpo" / "checkpoints" / "step_00000001").mkdir(parents=True)
    assert dict(stage_configs(cfg))["grpo"].resume == "auto"  # a stopped GRPO stage continues


@pytest.mark.parametrize("overrides, message", [
    (["pipeline.stages=[{name: a, stage: sft, set: {model.path: 'stage:b'}}]"], "refers to stage:b, which is not an earlier"),
    (["pipeline.stages=[{name: a, stage: fly}]"], "stage must be one of"),
    (["pipeline.stages=[{name: a, stage: sft}, {name: a, stage: sft}]"], "names must be distinct"),
    (["pipeline.stages=[]"], "needs pipeline.stages"),
])
def test_pipeline_config_errors(overrides, message, tmp_path):
    cfg = make_cfg("experiment=r1_smoke", f"output_dir={tmp_path}", *overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_pipeline_stage_setting_errors_name_the_stage(tmp_path, cache_dir):
    from orchestration.stages.pipeline import stage_configs

    cfg = make_cfg("experiment=r1_smoke", f"output_dir={tmp_path}",
                   "pipeline.stages=[{name: a, stage: sft, set: {learner.lr: -1.0}}]")
    with pytest.raises(ConfigError, match="pipeline stage 'a': learner.lr must be > 0"):
        stage_configs(cfg)
    cfg = make_cfg("experiment=r1_smoke", f"output_dir={tmp_path}",
                   "pipeline.stages=[{name: a, stage: sft, set: {learner.nope: 1}}]")
    with pytest.raises(ConfigError, match="pipeline stage 'a': cannot set learner.nope"):
        stage_configs(cfg)


def test_rejection_rules_must_name_scored_rewards(tmp_path):
    cfg = make_cfg("experiment=r1_smoke", "stage=rejection_sampling", "+rejection.min_parts.digits=1")
    with pytest.raises(ConfigError, match="rejection.min_parts names digits, not in reward.functions"):
        validate(cfg)


# --------------------------------------------------------------------------- reasoning settings


def test_reasoning_settings_reach_the_reward_process():
    from actors.scoring import Scorer
    from actors.types import ScoreRequest

    settings = {"think_format": {"open": "<r>", "close": "</r>"}, "language_consistency": {"script": "cyrillic", "open": "<r>", "close": "</r>"}}
    with Scorer({"think_format": 1.0, "language_consistency": 1.0}, settings=settings) as scorer:
        rows = scorer.score([ScoreRequest(["<r>два плюс два</r>4", "<think>two plus two</think>4"], "4")])[0]
    assert [s.parts for s in rows] == [{"think_format": 1.0, "language_consistency": 1.0},
                                       {"think_format": 0.0, "language_consistency": 0.0}]


def test_reasoning_settings_are_validated():
    with pytest.raises(ConfigError, match="unknown script 'klingon'"):
        validate(make_cfg("experiment=r1_smoke", "reasoning.language=klingon"))
    with pytest.raises(ConfigError, match="two different non-empty strings"):
        validate(make_cfg("experiment=r1_smoke", "reasoning.close_tag='<think>'"))
