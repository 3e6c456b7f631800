"""The start-up checks of GPU nodes, on CPU: what a driver too old for torch's CUDA, a CPU build of
torch or a missing driver says, and that the cluster check runs only for GPU topologies."""

from __future__ import annotations

import pytest

from common.gpu import cuda_problem
from orchestration.cluster.placement import check_gpu_nodes
from orchestration.config import ConfigError
from tests.test_config import make_cfg


def test_usable_cuda_is_no_problem():
    assert cuda_problem(available=lambda: True) is None


@pytest.mark.parametrize("built,driver,expected", [
    ("13.0", "535.104.05", r"\(CUDA 13.0\) cannot use the GPU with NVIDIA driver 535.104.05; CUDA 13.0 needs an R580\+ driver"),
    ("13.0", "580.65.06", r"\(CUDA 13.0\) cannot use the GPU with NVIDIA driver 580.65.06$"),
    ("13.0", None, r"\(CUDA 13.0\) finds no NVIDIA driver on this node"),
    ("", "580.65.06", r"is a CPU build: install the CUDA build on GPU nodes"),
])
def test_what_an_unusable_gpu_says(built, driver, expected):
    why = cuda_problem(available=lambda: False, driver=lambda: driver, torch_cuda=built)
    assert why is not None and "\n" not in why
    assert __import__("re").search(expected, why), why


def test_cluster_check_only_for_gpu_topologies_and_names_the_node():
    calls = []

    def probe():
        calls.append(1)
        return [("10.0.0.4", None), ("10.0.0.5", "torch 2.14.0 (CUDA 13.0) cannot use the GPU with NVIDIA driver 535.1")]

    check_gpu_nodes(make_cfg(), probe)  # the default topology uses no GPU: nothing probed
    assert calls == []
    with pytest.raises(ConfigError, match=r"^GPU node 10.0.0.5: torch 2.14.0 \(CUDA 13.0\) cannot use"):
        check_gpu_nodes(make_cfg("topology=gpu_pools"), probe)
    check_gpu_nodes(make_cfg("topology=gpu_pools"), lambda: [("10.0.0.4", None)])
