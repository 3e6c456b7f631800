"""Tests for orchestration/config/__init__.py (schema, validate, resources), the YAML presets under conf/,
orchestration/models.check_model_path and the `raygrpo` CLI's user-error path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from orchestration.config import ConfigError, register_configs, validate
from orchestration.cluster.plan import required_resources, validate_resources

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
GROUPS = sorted(d.name for d in CONF.iterdir() if d.is_dir() and d.name != "experiment")
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PRESETS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def make_cfg(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _package(path: Path, default: str) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("# @package"):
            return line.split()[-1]
    return default


def _assert_contains(expected, actual, where: str) -> None:
    """Every leaf the YAML sets is present, with that value, in the composed config."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        for key, value in expected.items():
            if key == "defaults":
                continue
            assert key in actual, f"{where}.{key} missing"
            _assert_contains(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list) and any(isinstance(v, dict) for v in expected):  # e.g. pipeline stages
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual)):
            _assert_contains(e, a, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: composed {actual!r}, YAML says {expected!r}"


def _validate_with_env(cfg, monkeypatch) -> None:
    if cfg.logger.wandb.mode == "online":  # the preset documents that it needs the key
        monkeypatch.setenv("WANDB_API_KEY", "test-key-not-real")
    validate(cfg)


# --------------------------------------------------------------------------- presets


def test_presets_discovered():
    assert {"algo", "topology", "model", "logger", "rollout", "learner"} <= set(GROUPS)
    assert "smoke" in EXPERIMENTS
    assert ("topology", "gpu_pools") in PRESETS and ("logger", "online") in PRESETS


def test_default_config_validates(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg()
    validate(cfg)
    # the defaults list selects tiny_qwen2 / local / offline / grpo
    assert cfg.model.path == "builtin:tiny-qwen2"
    assert cfg.topology.num_cpus == 8
    assert cfg.logger.wandb.mode == "offline"
    assert cfg.algo.kl_coef == 0.04
    assert cfg.experiment == "default"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name, monkeypatch):
    cfg = make_cfg(f"experiment={name}")
    _validate_with_env(cfg, monkeypatch)
    path = CONF / "experiment" / f"{name}.yaml"
    package = _package(path, "experiment")
    node = cfg if package == "_global_" else cfg[package]
    _assert_contains(OmegaConf.to_container(OmegaConf.load(path)),
                     OmegaConf.to_container(node, resolve=True), package)


def test_demo_lora_is_the_demo_with_adapters():
    """experiment=demo_lora differs from experiment=demo in its name (and so its output_dir), the lr and the adapters only,
    so the README's comparison of the two stays like for like."""
    demo = OmegaConf.to_container(make_cfg("experiment=demo"), resolve=True)
    lora = OmegaConf.to_container(make_cfg("experiment=demo_lora"), resolve=True)
    assert (lora["learner"]["lr"], demo["learner"]["lr"]) == (1e-4, 1e-5)
    assert lora["learner"]["lora"]["rank"] == 16 and demo["learner"]["lora"]["rank"] == 0
    for cfg in (demo, lora):
        del cfg["experiment"], cfg["output_dir"], cfg["learner"]["lr"], cfg["learner"]["lora"]  # runs/<experiment>
    assert lora == demo


@pytest.mark.parametrize("group,preset", PRESETS, ids=[f"{g}={p}" for g, p in PRESETS])
def test_preset_composes_and_validates(group, preset, monkeypatch):
    cfg = make_cfg(f"{group}={preset}")
    if (group, preset) == ("reward", "custom"):  # a starting point: the user adds functions
        with pytest.raises(ConfigError, match="reward.functions is empty"):
            validate(cfg)
    elif (group, preset) == ("reward", "env"):  # the environment's own reward: with an env that has one
        with pytest.raises(ConfigError, match="needs a multi-turn env"):
            validate(cfg)
        _validate_with_env(make_cfg("reward=env", "env=skyrl_gsm8k"), monkeypatch)
    else:
        _validate_with_env(cfg, monkeypatch)
    path = CONF / group / f"{preset}.yaml"
    package = _package(path, group)
    node = cfg if package == "_global_" else OmegaConf.select(cfg, package)
    _assert_contains(OmegaConf.to_container(OmegaConf.load(path)),
                     OmegaConf.to_container(node, resolve=True), package)


def test_smoke_experiment_values():
    cfg = make_cfg("experiment=smoke")
    assert cfg.experiment == "smoke"
    assert cfg.output_dir == "runs/smoke"
    assert (cfg.rollout.num_actors, cfg.learner.num_ranks, cfg.reward.num_workers) == (2, 2, 1)
    assert cfg.reward.functions["digits"] == 1.0


def test_smoke_reward_functions_are_the_ones_it_lists():
    cfg = make_cfg("experiment=smoke")
    assert dict(cfg.reward.functions) == {"accuracy": 1.0, "digits": 1.0}


def test_rollout_resources_override_documented_syntax():
    cfg = make_cfg("+topology.rollout_resources.rollout_node=1")
    assert dict(cfg.topology.rollout_resources) == {"rollout_node": 1.0}


# --------------------------------------------------------------------------- validate: bad configs


BAD = [
    (["rollout.group_size=1"], r"rollout\.group_size"),
    (["rollout.group_size=0"], r"rollout\.group_size"),
    (["learner.num_ranks=3"], r"learner\.num_ranks \(3\)"),  # 4 × 4 = 16 completions, 16 % 3 != 0
    (["learner.num_minibatches=3"], r"learner\.num_minibatches \(3\)"),
    (["rollout.prompts_per_step=3", "rollout.group_size=2", "learner.num_ranks=4"],
     r"rollout\.prompts_per_step × rollout\.group_size = 6"),
    (["model.path=/nonexistent/dir"], r"model[ .]path.*/nonexistent/dir"),
    (["model.path=builtin:nope"], r"built-in model 'builtin:nope'"),
    (["model.path="], r"model\.path is not set"),
    (["+reward.functions.no_such_reward=1.0"], r"reward function 'no_such_reward': unknown reward"),
    (["eval.reward=no_such_reward"], r"reward function 'no_such_reward': unknown reward"),
    (["data.epochs=0"], r"data\.epochs"),
    (["eval.reward=code_tests"], r"reward\.timeout_s \(5\) must leave code_tests' 5 s limit room"),
    (["eval.reward=code_tests", "reward.timeout_s=15", "reward.code.sandbox=nsjail"], r"reward\.code\.sandbox must be bwrap or none"),
    (["data.val_files=[v.jsonl]"], r"data\.val_files is set but data\.train_files is not"),
    (["logger.samples_every_n_steps=-1"], r"logger\.samples_every_n_steps"),
    (["algo.clip_low=0"], r"algo\.clip_low"),
    (["algo.clip_low=1.5"], r"algo\.clip_low"),
    (["algo.clip_low=1"], r"algo\.clip_low"),
    (["algo.clip_high=0"], r"algo\.clip_high"),
    (["algo.clip_high=-0.1"], r"algo\.clip_high"),
    (["algo.kl_coef=-0.01"], r"algo\.kl_coef"),
    (["algo.kl_estimator=k4"], r"algo\.kl_estimator"),
    (["algo.loss_agg=mean"], r"algo\.loss_agg"),
    (["algo.advantage=ppo"], r"algo\.advantage"),
    (["algo.loss=dpo"], r"algo\.loss must"),
    (["rollout.temperature=0"], r"rollout\.temperature"),
    (["rollout.temperature=-1"], r"rollout\.temperature"),
    (["rollout.top_p=0"], r"rollout\.top_p"),
    (["learner.micro_batch_tokens=100"], r"learner\.micro_batch_tokens \(100\)"),  # < 256 + 32
    (["learner.micro_batch_tokens=287"], r"learner\.micro_batch_tokens \(287\)"),  # one short
    (["logger.wandb.mode=online"], r"logger\.wandb\.mode=online.*WANDB_API_KEY"),
    (["logger.wandb.mode=shared"], r"logger\.wandb\.mode"),
    (["steps=0"], r"steps"),
    (["rollout.num_actors=5"], r"rollout\.prompts_per_step \(4\).*rollout\.num_actors \(5\)"),
    (["rollout.max_prompt_tokens=1000"], r"model\.max_model_len"),
    (["rollout.tensor_parallel_size=2"], r"rollout\.tensor_parallel_size"),
    (["learner.schedule=linear"], r"learner\.schedule"),
    (["learner.lr=0"], r"learner\.lr"),
    (["reward.timeout_s=0"], r"reward\.timeout_s"),
    (["reward.num_workers=0"], r"reward\.num_workers"),
    (["task.name=gsm8k"], r"task 'gsm8k'"),
    (["sync.bucket_mb=0"], r"sync\.bucket_mb"),
    (["sync.backend=mpi"], r"sync\.backend"),
    # GPU topologies that cannot work (rejected before any actor starts)
    (["topology=gpu_pools", "topology.learner_gpus=0.5"], r"topology\.learner_gpus must be 0 or 1"),
    (["topology=gpu_pools", "rollout.tensor_parallel_size=2"], r"tensor_parallel_size=2 needs topology\.rollout_gpus=2"),
    (["topology=gpu_pools", "topology.rollout_gpus=2"], r"rollout_gpus \(2\) > 1 needs rollout\.tensor_parallel_size=2"),
    (["topology=gpu_pools", "topology.rollout_gpus=0.5"], r"engines that share a GPU cannot all join an NCCL"),
    (["topology=gpu_pools", "topology.rollout_gpus=0.5", "sync.backend=gloo", "rollout=gpu"],
     r"2 engines share each GPU .* 1\.70 of a GPU; lower it to 0\.47"),
    (["topology=gpu_pools", "topology.learner_gpus=0"], r"only the rollout side has GPUs, so sync\.backend=auto"),
    (["topology=gpu_pools", "topology.rollout_gpus=0"], r"only the learner side has GPUs"),
    (["topology=gpu_pools", "topology.learner_gpus=0", "sync.backend=nccl"], r"sync\.backend=nccl needs GPUs on both"),
    (["sync.backend=shared"], r"sync\.backend=shared needs topology\.colocate=true"),
    (["topology.colocate=true", "learner.num_ranks=2"], r"rollout\.num_actors \(1\) must equal learner\.num_ranks \(2\)"),
    (["topology.colocate=true", "sync.backend=nccl"], r"NCCL cannot join two processes on one GPU"),
    (["topology=gpu_pools", "topology.colocate=true"], r"rollout_gpus \+ topology\.learner_gpus must be <= 1"),
    (["topology.strategy=RANDOM"], r"topology\.strategy"),
]


@pytest.mark.parametrize("overrides,match", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_validate_rejects(overrides, match, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg(*overrides)
    with pytest.raises(ConfigError, match=match) as info:
        validate(cfg)
    assert "\n" not in str(info.value)  # one line, shown as is by the CLI


def test_validate_rejects_dir_without_config_json(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    cfg = make_cfg(f"model.path={tmp_path}")
    with pytest.raises(ConfigError, match=r"model path .* holds no config\.json") as info:
        validate(cfg)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
    validate(cfg)  # the same directory with a model's config.json is accepted


def test_validate_wandb_online_with_key(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "test-key-not-real")
    validate(make_cfg("logger.wandb.mode=online"))


def _with_reward(cfg, name: str, weight: float):
    with open_dict(cfg):
        cfg.reward.functions[name] = weight
    return cfg


@pytest.mark.parametrize("overrides", [
    ["topology=gpu_pools", "rollout=gpu", "learner=gpu"],
    ["topology=gpu_pools", "rollout=gpu", "learner=gpu", "rollout.tensor_parallel_size=2", "topology.rollout_gpus=2"],
    ["topology=gpu_pools", "topology.rollout_gpus=0.5", "sync.backend=gloo", "rollout.gpu_memory_utilization=0.45"],
    ["topology=gpu_pools", "topology.learner_gpus=0", "sync.backend=gloo"],
    ["topology=gpu_pools", "topology.colocate=true", "topology.rollout_gpus=0.4", "topology.learner_gpus=0.6"],
    ["experiment=smoke", "topology.colocate=true"],
])
def test_validate_accepts_workable_gpu_topologies(overrides):
    validate(make_cfg(*overrides))


def test_sync_backend_auto():
    from orchestration.config.gpu_layout import sync_backend

    assert sync_backend(make_cfg()) == "gloo"
    assert sync_backend(make_cfg("topology=gpu_pools")) == "nccl"
    assert sync_backend(make_cfg("topology=gpu_pools", "sync.backend=gloo")) == "gloo"
    assert sync_backend(make_cfg("topology.colocate=true")) == "shared"


def test_validate_accepts_hub_id_and_user_reward():
    # an `org/name` hub id is left to transformers; an importable reward path (YAML's colon form) is accepted
    cfg = make_cfg("model.path=HuggingFaceTB/SmolLM2-135M-Instruct")
    validate(_with_reward(cfg, "tests.reward_fixtures:broken", 0.5))


def test_validate_rejects_unimportable_user_reward():
    cfg = _with_reward(make_cfg(), "tests.reward_fixtures:no_such_function", 1.0)
    with pytest.raises(ConfigError, match=r"reward function 'tests\.reward_fixtures:no_such_function': cannot load"):
        validate(cfg)


def test_user_reward_from_the_command_line():
    """The dotted form parses as a Hydra override; `+` adds it to the preset's functions, `~`
    drops one, and `reward=custom` starts from none."""
    cfg = make_cfg("+reward.functions={tests.reward_fixtures.broken: 0.5}")
    assert dict(cfg.reward.functions) == {"accuracy": 1.0, "format": 0.1, "tests.reward_fixtures.broken": 0.5}
    validate(cfg)
    cfg = make_cfg("~reward.functions.format", "+reward.functions={tests.reward_fixtures.broken: 0.5}")
    assert dict(cfg.reward.functions) == {"accuracy": 1.0, "tests.reward_fixtures.broken": 0.5}
    cfg = make_cfg("reward=custom", "+reward.functions={tests.reward_fixtures.with_metadata: 1.0}")
    assert dict(cfg.reward.functions) == {"tests.reward_fixtures.with_metadata": 1.0}
    validate(cfg)


def test_cli_reward_whose_import_fails_names_it(tmp_path):
    """A reward module that raises on import stops the run before Ray starts: one line naming the
    function and the error."""
    (tmp_path / "my_rewards.py").write_text("import no_such_dependency_xyz\n\ndef score(c, a):\n    return 1.0\n")
    res = run_cli(tmp_path, "+reward.functions={my_rewards.score: 1.0}")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = _error_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert "'my_rewards.score'" in lines[0] and "No module named 'no_such_dependency_xyz'" in lines[0]


@pytest.mark.parametrize("override", ["learner.num_minibatches=0", "learner.num_ranks=0"])
def test_validate_zero_ranks_or_minibatches(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        validate(make_cfg(override))


def test_validate_negative_minibatches():
    with pytest.raises(ConfigError, match=r"learner\.num_minibatches"):
        validate(make_cfg("learner.num_minibatches=-1"))


def test_validate_bad_dtype():
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        validate(make_cfg("model.dtype=bf16"))


# --------------------------------------------------------------------------- resources


def test_required_resources_by_hand():
    cfg = make_cfg("topology=gpu_pools", "rollout.num_actors=2", "learner.num_ranks=2", "reward.num_workers=3")
    # CPU: 2 rollout × 4 + 2 learner × 4 + 3 reward × 1 = 19; GPU: 2 × 1 + 2 × 1 = 4;
    # rollout_node: 2 × 1; learner_node: 2 × 1
    assert required_resources(cfg) == {"CPU": 19.0, "GPU": 4.0, "rollout_node": 2.0, "learner_node": 2.0}


def test_required_resources_smoke_and_default():
    # smoke: 2 × 1 + 2 × 1 + 1 × 0.5 = 4.5 CPU; no GPU entry when none is asked for
    assert required_resources(make_cfg("experiment=smoke")) == {"CPU": 4.5}
    assert required_resources(make_cfg()) == {"CPU": 2.5}


def test_validate_resources_not_enough_cpu():
    cfg = make_cfg("experiment=smoke")
    with pytest.raises(ConfigError, match=r"asks for 4\.5 CPU but the Ray cluster has 4\b"):
        validate_resources(cfg, {"CPU": 4.0, "memory": 1e9})


def test_validate_resources_custom_resource_absent():
    cfg = make_cfg("+topology.rollout_resources={rollout_node: 1}")
    with pytest.raises(ConfigError, match=r"1 rollout_node but the Ray cluster has 0"):
        validate_resources(cfg, {"CPU": 64.0, "GPU": 8.0})
    validate_resources(cfg, {"CPU": 64.0, "rollout_node": 1.0})


def test_validate_resources_gpu_absent():
    cfg = make_cfg("topology=gpu_pools")
    with pytest.raises(ConfigError, match=r"GPU"):
        validate_resources(cfg, {"CPU": 64.0, "rollout_node": 8.0, "learner_node": 8.0})


def test_validate_resources_enough():
    validate_resources(make_cfg("experiment=smoke"), {"CPU": 4.5})
    validate_resources(make_cfg("experiment=smoke"), {"CPU": 16.0, "GPU": 0.0, "memory": 1e10})
    validate_resources(make_cfg("topology=gpu_pools"),
                       {"CPU": 9.0, "GPU": 2.0, "rollout_node": 1.0, "learner_node": 1.0})


# --------------------------------------------------------------------------- CLI


RAYGRPO = Path(sys.executable).parent / "raygrpo"


def run_cli(tmp_path: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("WANDB_API_KEY", None)
    env["RAYGRPO_CACHE"] = str(tmp_path / "cache")
    cmd = [str(RAYGRPO)] if RAYGRPO.exists() else [sys.executable, "-m", "orchestration"]
    return subprocess.run(cmd + list(overrides), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("raygrpo: error:")]


def test_cli_group_size_error(tmp_path):
    res = run_cli(tmp_path, "rollout.group_size=1")
    assert res.returncode == 2, res.stderr
    lines = _error_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert "group_size" in lines[0]
    assert "Traceback" not in res.stderr


def test_cli_missing_model_path(tmp_path):
    res = run_cli(tmp_path, "model.path=/nonexistent")
    assert res.returncode == 2, res.stderr
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and "/nonexistent" in lines[0], res.stderr


def test_cli_topology_too_big_for_cluster(tmp_path):
    res = run_cli(tmp_path, "experiment=smoke", "topology.num_cpus=2", "dry_run=true")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = _error_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert "CPU" in lines[0] and "4.5" in lines[0]


def test_cli_smoke_dry_run_placement(tmp_path):
    res = run_cli(tmp_path, "experiment=smoke", "dry_run=true")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.split()[:2] == ["role", "index"]]
    assert len(header) == 1, res.stdout
    rows = [line.split() for line in lines[header[0] + 1:] if line.strip()]
    by_role: dict[str, list[list[str]]] = {}
    for r in rows:
        by_role.setdefault(r[0], []).append(r)
    # the order of the role blocks is not part of the contract; their contents are
    assert sorted(by_role) == ["learner", "reward", "rollout"], res.stdout
    assert [r[1] for r in by_role["rollout"]] == ["0", "1"], res.stdout
    assert [r[1] for r in by_role["learner"]] == ["0", "1"], res.stdout
    assert [r[1] for r in by_role["reward"]] == ["0"], res.stdout
    assert [r[-1] for r in by_role["rollout"] + by_role["learner"]] == ["CPU=1"] * 4
    assert by_role["reward"][0][-1] == "CPU=0.5"
    assert len(rows) == 5
    assert not (tmp_path / "cache" / "models").exists()  # a dry run builds no model


def test_tp_engine_gets_one_gpu_bundle_per_worker():
    """vLLM's Ray executor takes one-GPU bundles only: a TP=2 engine reserves two, its CPUs and
    custom resources spread over them (the engine actor itself holds nothing)."""
    from orchestration.cluster.placement import tp_engine_bundles

    cfg = make_cfg("topology=multinode")
    assert tp_engine_bundles(cfg) == [{"CPU": 4.0, "GPU": 1.0, "rollout_node": 0.5}] * 2
    assert required_resources(cfg, ("rollout",)) == {"CPU": 64.0, "GPU": 16.0, "rollout_node": 8.0}


def test_colocated_pairs_reserve_whole_gpus():
    cfg = make_cfg("topology=single_gpu_colocated", "rollout.num_actors=2", "learner.num_ranks=2",
                   "topology.rollout_gpus=0.25", "topology.learner_gpus=0.25")
    assert required_resources(cfg)["GPU"] == 2.0  # not 1.0: two pairs never share one GPU


def test_job_runtime_env_keys_are_not_set_twice(monkeypatch):
    """Ray refuses a runtime env whose env_vars repeat a key the submitted job already sets."""
    import json

    from orchestration.cluster.placement import job_env_vars, worker_env

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"VLLM_LOGGING_LEVEL": "INFO"}}}))
    assert job_env_vars() == {"VLLM_LOGGING_LEVEL": "INFO"}
    assert "VLLM_LOGGING_LEVEL" in worker_env()
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert job_env_vars() == {}
