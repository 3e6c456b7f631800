"""A learner rank's part of a checkpoint: model and optimizer shards (torch.distributed.checkpoint,
all ranks together) under `<path>/learner`, this rank's LR schedule and RNG in `rank{r}.pt`, and on
rank 0 what `raygrpo export` needs to rebuild the model without its source (`hf/`: config,
tokenizer and, with LoRA, the adapter's config).

With LoRA a checkpoint holds only what changes: the adapters and their optimizer state. The frozen
base is the model's own checkpoint, loaded at setup (`base_model_name_or_path` in the adapter
config names it). Reading runs nothing from the files (`learner.checkpoint_io`).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def save(worker: Any, path: str) -> None:
    """`worker`'s (a `LearnerWorker`) shards and rank state into `path`/learner."""
    import torch.distributed.checkpoint as dcp

    model, optim = state_dicts(worker)
    dcp.save({"model": model, "optim": optim}, checkpoint_id=f"{path}/learner")
    cuda = torch.cuda.get_rng_state() if worker.device.type == "cuda" else None
    torch.save({"scheduler": worker.scheduler.state_dict(), "rng": {"cpu": torch.get_rng_state(), "cuda": cuda},
                "world_size": worker.world_size},
               f"{path}/learner/rank{worker.rank}.pt")  # plain data and tensors: loads with weights_only=True
    if worker.rank == 0:
        from transformers import AutoTokenizer

        worker.model.config.save_pretrained(f"{path}/learner/hf")
        AutoTokenizer.from_pretrained(worker.model_path).save_pretrained(f"{path}/learner/hf")
        if worker.lora:
            worker.model.peft_config["default"].save_pretrained(f"{path}/learner/hf")
    dist.barrier()


def load(worker: Any, path: str) -> None:
    """Restore what `save` wrote; DCP reshards when the world size changed (then each rank takes rank
    0's schedule and its own RNG is not restored)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from learner.checkpoint_io import SafeLoadPlanner, SafeReader, read_rank_state

    model, optim = state_dicts(worker)
    state = {"model": model, "optim": optim}
    dcp.load(state, storage_reader=SafeReader(f"{path}/learner"), planner=SafeLoadPlanner())
    set_state_dict(worker.model, worker.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(worker))
    own = f"{path}/learner/rank{worker.rank}.pt"  # after the collective load: a refusal here stalls no peer
    extra = read_rank_state(own if os.path.exists(own) else f"{path}/learner/rank0.pt")
    worker.scheduler.load_state_dict(extra["scheduler"])
    if extra["world_size"] == worker.world_size:
        torch.set_rng_state(extra["rng"]["cpu"])
        if extra["rng"]["cuda"] is not None and worker.device.type == "cuda":
            torch.cuda.set_rng_state(extra["rng"]["cuda"])


def _options(worker: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    lora = worker.lora is not None
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def state_dicts(worker: Any) -> tuple[dict, dict]:
    """(model, optimizer) state of a checkpoint; with LoRA the adapters' alone (a tied output head, an
    alias of the frozen embedding, slips past `ignore_frozen_params`: dropped by name)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from learner.lora import is_adapter

    model, optim = get_state_dict(worker.model, worker.optimizer, options=_options(worker))
    return ({k: v for k, v in model.items() if is_adapter(k)} if worker.lora else model), optim
