"""Whether this process can use the GPU Ray granted it, and what to say when it cannot.

torch 2.14 (the build vLLM 0.33 pins) needs CUDA 13, so an NVIDIA driver of the R580 series or
newer; on an older driver `torch.cuda.is_available()` is False and every CUDA call fails deep
inside vLLM or FSDP. `cuda_problem()` names the mismatch in one line (torch's CUDA version, the
driver's), checked at start-up on every GPU node (`orchestration.cluster.placement`) and again by
each learner rank before it picks its device.
"""

from __future__ import annotations

import subprocess
from typing import Callable

MIN_DRIVER = 580  # the R580 series: the first with CUDA 13


def driver_version() -> str | None:
    """The NVIDIA driver's version (e.g. "580.65.06"), or None where there is none."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            for word in f.read().split():
                if word[:1].isdigit() and word.count(".") >= 1:
                    return word
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def cuda_problem(available: Callable[[], bool] | None = None, driver: Callable[[], str | None] = driver_version,
                 torch_cuda: str | None = None) -> str | None:
    """Why this process cannot use CUDA (one line), or None when it can."""
    import torch

    if (available or torch.cuda.is_available)():
        return None
    built = torch_cuda if torch_cuda is not None else torch.version.cuda
    if not built:
        return f"torch {torch.__version__} is a CPU build: install the CUDA build on GPU nodes (make EXTRA=gpu)"
    have = driver()
    if have is None:
        return f"torch {torch.__version__} (CUDA {built}) finds no NVIDIA driver on this node"
    major = int(have.split(".")[0]) if have.split(".")[0].isdigit() else 0
    need = f"; CUDA {built} needs an R{MIN_DRIVER}+ driver" if major < MIN_DRIVER and built.startswith("13") else ""
    return f"torch {torch.__version__} (CUDA {built}) cannot use the GPU with NVIDIA driver {have}{need}"
