"""The learner's policy as files: a Hugging Face model directory, or with LoRA a peft adapter
directory (`adapter_config.json`, `adapter_model.safetensors`) and, with `merge`, the merged model
(base + scale · B A) beside it. Written by rank 0 from the gathered full state dict."""

from __future__ import annotations

import os

import torch

MAX_SHARD = "2GB"


def write_policy(model: torch.nn.Module, state: dict[str, torch.Tensor], out: str, tokenizer_path: str,
                 lora: bool, merge: bool) -> list[str]:
    """Write `model` (whose full state is `state`) into `out` with its tokenizer: the model itself,
    or with `lora` the adapter into `out` (`merge`: the merged model into `out`, the adapter into
    `out/adapter`). Returns the files written, relative to `out`."""
    from transformers import AutoTokenizer

    dirs = [out]
    if not lora:
        model.save_pretrained(out, state_dict=state, safe_serialization=True, max_shard_size=MAX_SHARD)
    else:
        adapter = os.path.join(out, "adapter") if merge else out
        model.save_pretrained(adapter, state_dict=state)  # peft: the adapter's tensors and config only
        if merge:
            merged_model(model, state).save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD)
            dirs.append(adapter)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    for d in dirs:
        tokenizer.save_pretrained(d)
    return sorted(os.path.relpath(os.path.join(root, f), out) for root, _, files in os.walk(out) for f in files)


def merged_model(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain transformers model of the base architecture holding base + scale · B A of every adapted
    layer (peft's merge formula), built from `state`, the peft model's full state dict."""
    from peft.tuners.lora import Linear as LoRALinear
    from transformers import AutoModelForCausalLM

    from learner.lora import ADAPTER, base_name, is_adapter, lora_delta

    weights = {base_name(k): v for k, v in state.items() if not is_adapter(k)}
    for prefix, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            a, b = (state[f"{prefix}.lora_{x}.{ADAPTER}.weight"].float() for x in "AB")
            key = base_name(f"{prefix}.base_layer.weight")
            weights[key] = (weights[key].float() + lora_delta(layer, a, b)).to(weights[key].dtype)
    base = model.get_base_model()
    with torch.device("meta"):
        merged = AutoModelForCausalLM.from_config(base.config, dtype=torch.float32)
    merged.load_state_dict(weights, strict=True, assign=True)
    merged.tie_weights()
    return merged
