"""LoRA on the learner: HF peft adapters on the frozen policy, and what the engines load from them.

`wrap` injects peft's LoRA layers (`get_peft_model`) before FSDP2 shards the model, so adapters
and base weights are sharded alike; only the adapters require gradients (peft freezes the rest),
and the worker gives the optimizer the trainable parameters alone. The KL reference is the same
model inside `disable_adapter()`: no second model in memory.

`LoRANames` says what a weight sync sends, like `learner.hf_names.CheckpointNames` for a plain
model, in one of two forms:
- `merged`: the base model's checkpoint tensors with every adapted linear layer's weight merged,
  W + scale · B A (computed from the gathered fp32 weights, peft's own formula), under the base
  model's names: engines without LoRA load it like a full sync;
- `adapter`: only the adapters' A and B, named as peft saves them
  (`base_model.model.<module>.lora_A.weight`), for engines that serve LoRA (vLLM's `enable_lora`),
  with `adapter_config` (peft's `adapter_config.json`) beside them.
"""

from __future__ import annotations

import json
from typing import Callable, Iterator

import torch

from learner.hf_names import CheckpointNames
from learner.spec import LoRASpec

ADAPTER = "default"  # peft's name of the one adapter
PREFIX = "base_model.model."  # what PeftModelForCausalLM puts before the base model's names
KINDS = ("merged", "adapter")


def wrap(model: torch.nn.Module, spec: LoRASpec) -> torch.nn.Module:
    """`model` with peft LoRA adapters on `spec.target_modules` (linear layers only), base frozen."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoRALinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = "all-linear" if list(spec.target_modules) == ["all-linear"] else list(spec.target_modules)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                        init_lora_weights=True if spec.init == "default" else spec.init, bias="none",
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    other = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)
             and not isinstance(m, LoRALinear)]
    if other:
        raise ValueError(f"learner.lora.target_modules reaches layers that are not linear ({other[0]}, ...): "
                         "LoRA here adapts linear layers only")
    return model


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_key(name: str) -> str:
    """peft's saved name of an adapter parameter (`get_peft_model_state_dict` drops the adapter's name)."""
    return name.replace(f".{ADAPTER}.", ".")


def base_name(name: str) -> str:
    """The base model's own name of a runtime parameter of the peft-wrapped model."""
    return name.removeprefix(PREFIX).replace(".base_layer.", ".")


def adapter_config(model: torch.nn.Module) -> str:
    """peft's `adapter_config.json` text for the engines (vLLM reads it beside the tensors)."""
    config = model.peft_config[ADAPTER].to_dict()
    return json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}, indent=1)


def lora_delta(layer: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """scale · B A of a peft LoRA linear layer from its full A [r, in] and B [out, r] (peft's formula,
    `lora.Linear.get_delta_weight`, on tensors the layer's sharded parameters are not)."""
    from peft.utils.other import transpose

    return transpose(b @ a, layer.fan_in_fan_out) * layer.scaling[ADAPTER]


class LoRANames:
    """What the engines load from a peft-wrapped policy: `kind` merged or adapter (module docstring)."""

    def __init__(self, model: torch.nn.Module, kind: str):
        from peft.tuners.lora import Linear as LoRALinear

        if kind not in KINDS:
            raise ValueError(f"LoRA weight sync kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
        # the LoRA layer whose base weight each runtime parameter is, for the merge
        self.layers = {f"{prefix}.base_layer.weight": m for prefix, m in model.named_modules()
                       if isinstance(m, LoRALinear)}
        if kind == "adapter":
            self.names = None
            self.per_param = {name: [(adapter_key(name), shape)] for name, shape in params if is_adapter(name)}
            return
        base = [(base_name(name), shape) for name, shape in params if not is_adapter(name)]
        self.names = CheckpointNames(model.get_base_model(), params=base)
        self.per_param = {name: self.names.per_param[base_name(name)] for name, _ in params if not is_adapter(name)}

    def manifest(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor the engines load, in sync order."""
        return [spec for outs in self.per_param.values() for spec in outs]

    def stream(self, model: torch.nn.Module, wanted: set[str], dtype: torch.dtype,
               full: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor in `dtype`) of the `wanted` tensors in manifest order; `full` gathers a
        sharded parameter (a collective: every rank runs the same gathers)."""
        for name, param in model.named_parameters():
            outs = self.per_param.get(name)
            if outs is None or not any(key in wanted for key, _ in outs):
                continue
            if self.kind == "adapter":
                yield outs[0][0], full(param.to(dtype))
                continue
            layer = self.layers.get(name)
            if layer is None:
                value = full(param.to(dtype))
            else:  # merged in fp32, from the fp32 master weights, then cast
                a, b = full(layer.lora_A[ADAPTER].weight), full(layer.lora_B[ADAPTER].weight)
                value = (full(param).float() + lora_delta(layer, a.float(), b.float())).to(dtype)
            for key, tensor in self.names.tensors(base_name(name), value):
                if key in wanted:
                    yield key, tensor
