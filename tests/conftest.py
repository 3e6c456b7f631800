"""Shared fixtures. Integration tests use one local Ray (loopback only, token auth) per session
and a tiny Qwen2 built on the fly in a per-session cache; nothing is downloaded."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = os.environ.get("RAYGRPO_TEST_CACHE") or str(tmp_path_factory.mktemp("raygrpo-cache"))
    os.environ["RAYGRPO_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def tiny_model(cache_dir):
    from common.models import resolve_model_path

    return resolve_model_path("builtin:tiny-qwen2")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    from orchestration.cluster.placement import start_local_ray, worker_env

    # the driver's own path: every Ray process on 127.0.0.1, token authentication on
    start_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False,
                    runtime_env={"env_vars": worker_env()})
    yield ray
    ray.shutdown()
