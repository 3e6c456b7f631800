"""Weight sync of a converted architecture into a real vLLM-CPU engine: a tiny Qwen2-MoE, whose
transformers runtime parameters (fused `experts.gate_up_proj`) are not its checkpoint's tensors
(`experts.{i}.gate_proj.weight`, ...). The learner sends checkpoint names, the engine checks that it
loaded every parameter it holds, and a sync that falls short fails and leaves the engine serving
nothing until a full one.

vLLM-CPU (0.32) itself does not reload MoE experts exactly: reloading the very weights an engine
started with moves its logprobs by ~0.02 on average (measured on this model: 1e-7 when only the
attention, the shared expert or the embeddings are reloaded, 0.020 when the routed experts are;
0.08 after the learner's steps below, against 3.1 for the engine left stale). So the engine is
held to "follows the learner" (a 40x smaller mismatch), not to the fp32 match of the dense model
(tests/test_learner.py)."""


from __future__ import annotations

import pytest

from actors.types import Prompt, SamplingSpec
from learner.batch import TrainBatch
from learner.objectives import SFTObjective

pytestmark = pytest.mark.slow
RELOAD_DRIFT = 0.15  # vLLM-CPU's own MoE reload error, with a margin (module docstring)


@pytest.fixture(scope="module")
def moe_model(cache_dir):
    from common.models import resolve_model_path

    return resolve_model_path("builtin:tiny-qwen2-moe")


@pytest.fixture(scope="module")
def engine(ray_local, moe_model):
    from actors.rollout import RolloutActor
    from actors.spec import EngineSpec

    actor = ray_local.remote(num_cpus=1)(RolloutActor).remote(EngineSpec(moe_model, dtype="float32", seed=5))
    ray_local.get(actor.ready.remote())
    yield actor
    ray_local.kill(actor)


@pytest.fixture(scope="module")
def group(ray_local, moe_model):
    from learner.group import LearnerGroup
    from learner.spec import LearnerSpec

    spec = LearnerSpec(model_path=moe_model, objective=SFTObjective(), lr=1e-2, total_steps=10, micro_batch_tokens=64,
                       grad_clip=1.0)
    g = LearnerGroup(2, [{"num_cpus": 1}] * 2, spec)
    yield g
    g.shutdown()


def _generate(ray, engine, n=4):
    prompts = [Prompt(str(i), f"What is {i} + {i + 3}?") for i in range(2)]
    groups = ray.get(engine.generate.remote(prompts, SamplingSpec(n=n, temperature=1.0, max_tokens=10))).groups
    return groups, TrainBatch(
        prompt_ids=[g.prompt_token_ids for g in groups for _ in g.completions],
        completion_ids=[c.token_ids for g in groups for c in g.completions],
        rollout_logprobs=[c.logprobs for g in groups for c in g.completions],
        advantages=[0.0] * 2 * n, loss_weights=[1.0] * 2 * n)


def _mismatch(group, batch) -> float:
    learner = [x for row in group.logprobs(batch) for x in row]
    engine = [x for row in batch.rollout_logprobs for x in row]
    return sum(abs(a - b) for a, b in zip(learner, engine)) / len(engine)


def _sync(group, engine, manifest=None):
    from orchestration.cluster.pools import RolloutPool
    from orchestration.cluster.weight_sync import WeightSync

    sync = WeightSync(group, RolloutPool([engine], timeout_s=60.0), backend="gloo", dtype="float32", bucket_mb=1,
                      timeout_s=60)
    if manifest is not None:
        sync.manifest = manifest
    sync.connect()
    return sync


def test_the_learner_sends_checkpoint_names_and_the_engine_follows(ray_local, engine, group):
    names = [name for name, _ in group.weight_manifest()]
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in names
    assert not [n for n in names if n.endswith("experts.gate_up_proj") or n.endswith("experts.down_proj")]
    _, batch = _generate(ray_local, engine)
    assert _mismatch(group, batch) < 1e-3  # the same model on both sides to start with
    for _ in range(4):
        group.train_step(batch)
    _, stale = _generate(ray_local, engine)
    before = _mismatch(group, stale)  # the learner moved: an engine left stale shows it
    _sync(group, engine).push(3)
    groups, fresh = _generate(ray_local, engine)
    assert {g.version for g in groups} == {3}
    after = _mismatch(group, fresh)
    print(f"mismatch before the sync {before:.4f}, after {after:.4f}")
    assert after < RELOAD_DRIFT and after < 0.1 * before


def test_a_sync_that_misses_a_parameter_fails_and_the_engine_serves_nothing_until_a_full_one(ray_local, engine,
                                                                                            group):
    from orchestration.cluster.weight_sync import WeightSyncError

    full = group.weight_manifest()
    short = [(n, s) for n, s in full if n != "model.norm.weight"]
    with pytest.raises(WeightSyncError, match=r"not 1 of its own: model\.norm\.weight"):
        _sync(group, engine, short).push(4)
    with pytest.raises(Exception, match="partly loaded"):
        _generate(ray_local, engine)
    _sync(group, engine).push(5)
    groups, fresh = _generate(ray_local, engine)
    assert {g.version for g in groups} == {5}
    assert _mismatch(group, fresh) < RELOAD_DRIFT
