"""Checkpoint names for the weight sync: what the engines load, from what the learner holds.

transformers 5 converts some architectures' checkpoints on load (qwen2_moe, qwen3_moe, mixtral,
deepseek_v3, ...: per-expert `experts.{i}.gate_proj.weight` / `up_proj.weight` become one fused
`experts.gate_up_proj` tensor), so the learner's runtime parameter names are not the names a vLLM
engine loads: sent as they are, vLLM's reload would skip them and log a warning, and the engine
would serve stale experts. `CheckpointNames` undoes the conversion with transformers' own reverse
(`revert_weight_conversion`, what `save_pretrained` writes), one runtime parameter at a time, so a
sync still gathers one parameter at a time. A model whose conversion is not one-parameter-to-many
(none of the mappings today) is refused when the group forms, never synced wrongly.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

Shape = tuple[int, ...]


class CheckpointNames:
    def __init__(self, model: torch.nn.Module, params: list[tuple[str, Shape]] | None = None):
        """`params`: (runtime name, shape) of what is sent, when not `model.named_parameters()` (a peft
        model's base parameters under their base names, see `learner.lora`)."""
        from transformers.core_model_loading import revert_weight_conversion

        self._revert = revert_weight_conversion
        self.model = model
        runtime = params if params is not None else [(name, tuple(p.shape)) for name, p in model.named_parameters()]
        self.per_param: dict[str, list[tuple[str, Shape]]] = {}
        for name, shape in runtime:
            out = self._revert(model, {name: torch.empty(shape, device="meta")})
            self.per_param[name] = [(key, tuple(t.shape)) for key, t in out.items()]
        self.identity = all(self.per_param[name] == [(name, shape)] for name, shape in runtime)
        if not self.identity:
            whole = self._revert(model, {name: torch.empty(shape, device="meta") for name, shape in runtime})
            one_by_one = {key: shape for outs in self.per_param.values() for key, shape in outs}
            if one_by_one != {key: tuple(t.shape) for key, t in whole.items()}:
                kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
                raise NotImplementedError(f"{kind}: transformers converts its checkpoint tensors many-to-one; "
                                          "the weight sync cannot name them one parameter at a time")

    def manifest(self) -> list[tuple[str, Shape]]:
        """(checkpoint name, shape) of every tensor the engines load, in sync order."""
        return [spec for outs in self.per_param.values() for spec in outs]

    def tensors(self, name: str, full: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint tensors (views where the conversion allows) of runtime parameter `name`
        whose full value is `full`."""
        if self.identity:
            yield name, full
            return
        out = self._revert(self.model, {name: full})
        for key, _ in self.per_param[name]:
            yield key, out[key]

    def stream(self, model: torch.nn.Module, wanted: set[str], dtype: torch.dtype,
               full: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, full tensor in `dtype`) of the `wanted` tensors in manifest order. Every
        rank gathers the same parameters with `full` (a collective), each cast to `dtype` first, so a
        bf16 wire gathers half the bytes of the fp32 master weights (the cast is elementwise)."""
        for name, param in model.named_parameters():
            if any(key in wanted for key, _ in self.per_param[name]):
                for key, tensor in self.tensors(name, full(param.to(dtype))):
                    if key in wanted:
                        yield key, tensor
