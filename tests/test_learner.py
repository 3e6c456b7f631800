"""The FSDP2 learner group (2 gloo ranks in Ray actors) against a real vLLM-CPU engine.

- learner logprobs of engine-sampled tokens match the engine's own (fp32, before any update);
- a GRPO step on a fixed batch lowers the surrogate loss measured against the old policy;
- an SFT step lowers the NLL; the engine follows the learner after a broadcast.
"""

from __future__ import annotations

import math

import pytest

from actors.types import Prompt, SamplingSpec
from learner.batch import TrainBatch
from learner.objectives import GRPOObjective, SFTObjective

TEMPERATURE = 0.8


def make_group(ray, tiny_model, objective, lr):
    from learner.group import LearnerGroup
    from learner.spec import LearnerSpec

    opts = [{"num_cpus": 1}] * 2
    return LearnerGroup(2, opts, LearnerSpec(model_path=tiny_model, objective=objective, lr=lr, total_steps=10,
                                             micro_batch_tokens=64, temperature=TEMPERATURE, grad_clip=1.0,
                                             logits_chunk=16))


@pytest.fixture(scope="module")
def engine(ray_local, tiny_model):
    from actors.rollout import RolloutActor
    from actors.spec import EngineSpec

    actor = ray_local.remote(num_cpus=1)(RolloutActor).remote(EngineSpec(tiny_model, dtype="float32", seed=3))
    ray_local.get(actor.ready.remote())
    yield actor
    ray_local.kill(actor)


@pytest.fixture(scope="module")
def sampled(ray_local, engine):
    prompts = [Prompt(str(i), f"What is {i} + {i + 3}?") for i in range(4)]
    spec = SamplingSpec(n=4, temperature=TEMPERATURE, max_tokens=12)
    groups = ray_local.get(engine.generate.remote(prompts, spec)).groups
    advantages = [(-1.0) ** j for g in groups for j in range(len(g.completions))]
    return TrainBatch(
        prompt_ids=[g.prompt_token_ids for g in groups for _ in g.completions],
        completion_ids=[c.token_ids for g in groups for c in g.completions],
        rollout_logprobs=[c.logprobs for g in groups for c in g.completions],
        advantages=advantages, loss_weights=[1.0] * 16)


def surrogate(batch, new, old):
    """-mean_i A_i · mean_t exp(logp_new − logp_old): the clipped surrogate inside the trust region."""
    vals = [a * sum(math.exp(n - o) for n, o in zip(ns, os)) / len(ns)
            for a, ns, os in zip(batch.advantages, new, old)]
    return -sum(vals) / len(vals)


def test_grpo_step_matches_engine_logprobs_and_lowers_the_loss(ray_local, tiny_model, sampled):
    group = make_group(ray_local, tiny_model, GRPOObjective(agg="seq_mean_token_mean"), lr=3e-3)
    try:
        old = group.logprobs(sampled)
        engine_lp = [lp for row in sampled.rollout_logprobs for lp in row]
        learner_lp = [lp for row in old for lp in row]
        mismatch = sum(abs(a - b) for a, b in zip(engine_lp, learner_lp)) / len(engine_lp)
        assert mismatch < 1e-3
        metrics = group.train_step(sampled)
        assert metrics["logprob_mismatch"] < 1e-3  # measured inside the step, before the update
        assert metrics["grad_norm"] > 0 and metrics["skipped_steps"] == 0
        assert metrics["clip_frac_low"] == 0 and metrics["clip_frac_high"] == 0  # on-policy: ratio 1
        new = group.logprobs(sampled)
        assert surrogate(sampled, new, old) < surrogate(sampled, old, old) - 1e-4
        # a NaN loss is survived: the step is skipped on every rank and the weights stay put
        poisoned = sampled.select(list(range(len(sampled))))
        poisoned.advantages = [float("nan")] * len(sampled)
        metrics = group.train_step(poisoned)
        assert metrics["skipped_steps"] == 1
        assert group.logprobs(sampled) == new
    finally:
        group.shutdown()


def test_sft_step_lowers_nll_and_engine_follows_broadcast(ray_local, tiny_model, sampled, engine, tmp_path):
    from orchestration.cluster.pools import RolloutPool
    from orchestration.cluster.weight_sync import WeightSync

    group = make_group(ray_local, tiny_model, SFTObjective(), lr=1e-2)
    try:
        nll = lambda lps: -sum(sum(r) for r in lps) / sum(len(r) for r in lps)  # noqa: E731
        before = nll(group.logprobs(sampled))
        group.train_step(sampled)
        group.train_step(sampled)
        after_lp = group.logprobs(sampled)
        assert nll(after_lp) < before - 0.05
        pool = RolloutPool([engine], timeout_s=60.0)  # wrap the module's engine
        sync = WeightSync(group, pool, backend="gloo", dtype="float32", bucket_mb=1, timeout_s=60)
        sync.connect()
        sync.push(5)
        spec = SamplingSpec(n=2, temperature=TEMPERATURE, max_tokens=12)
        fresh = ray_local.get(engine.generate.remote([Prompt("x", "What is 2 + 2?")], spec)).groups[0]
        assert fresh.version == 5
        probe = TrainBatch([fresh.prompt_token_ids] * 2, [c.token_ids for c in fresh.completions],
                           [c.logprobs for c in fresh.completions], [0.0, 0.0], [1.0, 1.0])
        learner_lp = [x for row in group.logprobs(probe) for x in row]
        engine_lp = [x for c in fresh.completions for x in c.logprobs]
        assert sum(abs(a - b) for a, b in zip(learner_lp, engine_lp)) / len(engine_lp) < 1e-3
        check_policy_export(group, tmp_path)
    finally:
        group.shutdown()


def check_policy_export(group, tmp_path):
    """Saved in place on the driver's node, or fetched file by file from another node's learner:
    the same HF directory (weights, config, tokenizer) either way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    group.save_pretrained(str(tmp_path / "here"))
    group.save_pretrained(str(tmp_path / "fetched"), driver_node="f" * 56)  # as if the driver were on another node
    here = {p.name: p.read_bytes() for p in (tmp_path / "here").iterdir()}
    fetched = {p.name: p.read_bytes() for p in (tmp_path / "fetched").iterdir()}
    assert here.keys() == fetched.keys() and "model.safetensors" in here and "tokenizer.json" in here
    assert here["model.safetensors"] == fetched["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fetched")
    assert AutoTokenizer.from_pretrained(tmp_path / "fetched")("12")["input_ids"]
    assert model.config.vocab_size > 0


def test_zero_gpu_actors_see_no_gpu_and_choose_the_cpu(ray_local):
    """With the job's environment a CPU-configured actor gets an empty CUDA_VISIBLE_DEVICES (Ray 2.5x
    would otherwise show it every GPU) and picks the CPU from what Ray granted, not from what it sees."""
    import os

    from learner.worker import choose_device

    @ray_local.remote(num_cpus=0.1)
    def probe():
        import ray

        return os.environ.get("CUDA_VISIBLE_DEVICES"), ray.get_gpu_ids(), str(choose_device(ray.get_gpu_ids()))

    assert ray_local.get(probe.remote()) == ("", [], "cpu")
    assert str(choose_device([3], problem=lambda: None)) == "cuda:0"  # Ray's CUDA_VISIBLE_DEVICES lists it alone
    os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] = "1"  # Ray leaves every GPU visible
    try:
        assert str(choose_device([3], problem=lambda: None)) == "cuda:3"
    finally:
        del os.environ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]
    with pytest.raises(RuntimeError, match=r"granted GPU \[3\]: torch .* cannot use the GPU with NVIDIA driver 535"):
        choose_device([3], problem=lambda: "torch 2.14.0 (CUDA 13.0) cannot use the GPU with NVIDIA driver 535.1")


@pytest.mark.parametrize("chunk", [0, 1, 5, 7, 64])
def test_chunked_logprobs_equal_the_whole_computation(chunk):
    """Values and gradients (logprobs and entropy) do not depend on the chunking: checkpointed chunks
    recompute in backward."""
    import torch

    from learner.logprobs import chunked_logprobs, token_entropy, token_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    w1, w2 = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    expected, expected_ent = token_logprobs(logits / 0.7, targets), token_entropy(logits / 0.7)
    ((expected * w1).sum() + (expected_ent * w2).sum()).backward()
    grad, logits.grad = logits.grad.clone(), None
    got, ent = chunked_logprobs(logits, targets, 0.7, chunk, entropy="grad")
    ((got * w1).sum() + (ent * w2).sum()).backward()
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(ent, expected_ent, atol=1e-6)
    assert torch.allclose(logits.grad, grad, atol=1e-6) and got.dtype == torch.float32
    logp, metric = chunked_logprobs(logits, targets, 0.7, chunk, entropy="metric")
    assert not metric.requires_grad and torch.allclose(metric, expected_ent, atol=1e-6)
    half, none = chunked_logprobs(logits.detach().to(torch.bfloat16), targets, 0.7, chunk)
    assert none is None and half.dtype == torch.float32 and torch.allclose(half, expected.detach(), atol=0.1)


def test_a_dead_learner_rank_stops_the_step_at_once_naming_it(ray_local, tiny_model, sampled):
    """Rank 0 would wait in a collective for the dead rank 1 (gloo's deadline: 30 min); the group
    answers at once instead, so the run stops and says to resume from its last checkpoint."""
    import time

    from learner.group import LearnerLost

    group = make_group(ray_local, tiny_model, GRPOObjective(), lr=1e-3)
    ray_local.kill(group.workers[1])
    start = time.perf_counter()
    with pytest.raises(LearnerLost, match="learner rank 1 died"):
        group.train_step(sampled)
    assert time.perf_counter() - start < 20
    for worker in group.workers:
        ray_local.kill(worker)


def _cast_then_gather(rank: int, port: int, queue) -> None:
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = fully_shard(torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3)))
    same = all(torch.equal(p.to(torch.bfloat16).full_tensor(), p.full_tensor().to(torch.bfloat16))
               and p.to(torch.bfloat16).full_tensor().dtype == torch.bfloat16 for p in model.parameters())
    queue.put((rank, same))
    dist.destroy_process_group()


def test_sharded_weights_cast_before_the_gather_equal_the_cast_after():
    """The weight broadcast gathers FSDP2 shards already cast to the wire dtype (half the traffic
    for bf16 from fp32 masters); the cast is elementwise, so the gathered tensors are the same."""
    import multiprocessing as mp

    from learner.worker import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_cast_then_gather, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(queue.get(timeout=5) for _ in procs) == [(0, True), (1, True)]
