"""vLLM worker extension: join the weight-broadcast group and load what the learner sends.

vLLM mixes this class into every worker of an engine (`worker_extension_cls`); the rollout actor
calls its methods through `LLM.collective_rpc`, so with tensor parallelism every TP worker joins
the group and receives full tensors, and vLLM's own `load_weights` shards them.

Received buckets are streamed straight into the worker's `reload_weights` (one bucket alive at a time, so a
sync needs at most one bucket of extra memory) and checksummed on the way for the learner to
compare. The checksums cover what arrived; what the model took is checked too: every parameter
the engine holds must be among those its `load_weights` reports loaded (vLLM itself only logs a
warning), else the sync fails naming them — a wrong name (a converted architecture sent by its
runtime names, a missing tensor) is an error, never an engine serving stale weights. Most of a CPU sync is that reload: vLLM-CPU keeps linear weights only packed for oneDNN
(their parameters are empty placeholders, so the model's `load_weights` fails after the first
load), and the reload rebuilds each layer's weights and packs them again.

With LoRA synced as an adapter (`learner.lora.sync=adapter`) the buckets hold only the adapter's A
and B tensors: worker 0 writes them, with the `adapter_config.json` the learner sent at the join, as a
peft directory the engine then loads as a new LoRA adapter (`RolloutActor.receive_weights`).
"""

from __future__ import annotations

import json
import logging
import os

import torch

from learner.weights import TensorSpec, device_checksum, make_transport, plan_buckets, read_checksums, unpack


class _NoLayerwiseWarning(logging.Filter):
    """Drops vLLM's "<Layer>: Failed to load weights" during our reloads: it names layers no tensor
    is sent for (a tied lm_head, rotary embeddings' buffers), every sync, while `receive_weights`
    already fails on any parameter the reload did not load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to load weights" not in record.getMessage()


class WeightSyncExtension:
    """Methods added to vLLM's Worker; `self.rank`, `self.device`, `self.model_runner` are vLLM's."""

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                          generation: int, timeout_s: float, manifest: list[tuple[str, tuple[int, ...]]],
                          dtype: str, bucket_bytes: int, secret: str, adapter_config: str | None = None) -> int:
        """Join generation `generation` of the broadcast group as rank `rank_offset + self.rank`,
        proving the group's `secret` (from the driver, through Ray) to its root. `adapter_config`:
        peft's adapter_config.json when the manifest is a LoRA adapter's tensors."""
        self._adapter_config = adapter_config
        old = getattr(self, "_weight_transport", None)
        if old is not None:
            old.close()
        self._wire_dtype = getattr(torch, dtype)
        specs = [TensorSpec(name, tuple(shape)) for name, shape in manifest]
        element_size = torch.empty((), dtype=self._wire_dtype).element_size()
        self._buckets = plan_buckets(specs, bucket_bytes, element_size)
        rank = rank_offset + self.rank
        self._weight_transport = make_transport(backend, host, port, rank, world_size, generation, timeout_s,
                                                secret=secret)
        return rank

    def receive_weights(self, adapter_dir: str | None = None) -> list[tuple[int, int]]:
        """Receive every bucket, load it into the model, return one checksum per bucket. With
        `adapter_dir` (a LoRA adapter's tensors): write them there as a peft directory instead."""
        sums: list = []  # per bucket, on the device until the end

        def stream():
            for bucket in self._buckets:
                numel = sum(spec.numel for spec in bucket)
                buf = torch.empty(numel, dtype=self._wire_dtype, device=self.device)
                self._weight_transport.recv(buf)
                sums.append(device_checksum(buf))
                yield from unpack(buf, bucket)

        if adapter_dir is not None:
            self._write_adapter(stream(), adapter_dir)
            return read_checksums(sums)
        head, embedding = self._tied_lm_head()
        old_gemm = getattr(embedding, "cpu_linear", None)
        loaded = self._reload(stream())
        if head is not None:
            gemm = getattr(embedding, "cpu_linear", None)
            if gemm is not None and gemm is not old_gemm:
                head.cpu_linear = gemm  # the reload just packed this very weight for the embedding
            else:
                head.quant_method.process_weights_after_loading(head)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # loaded before the engine samples again
        model = self.model_runner.get_model()
        # a LoRA-enabled engine wraps its linear layers: their weights load under the plain names
        missing = sorted({name.replace(".base_layer.", ".") for name, _ in model.named_parameters()} - loaded)
        if missing:
            raise RuntimeError(f"the engine loaded {len(loaded)} parameters but not {len(missing)} of its own: "
                               f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (names the model does not "
                               "load: a converted architecture sent by its runtime names, or a tensor missing)")
        return read_checksums(sums)

    def _write_adapter(self, weights, directory: str) -> None:
        """Worker 0 writes the received adapter tensors and the join's adapter_config.json (the
        engine's tensor-parallel workers share its node and read the same files)."""
        from safetensors.torch import save_file

        if self._adapter_config is None:
            raise RuntimeError("an adapter sync, but the weight group was joined without an adapter config")
        tensors = {name: t.to("cpu", copy=True).contiguous() for name, t in weights}  # views of one buffer: copied
        if self.rank == 0:
            os.makedirs(directory, exist_ok=True)
            save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
            with open(os.path.join(directory, "adapter_config.json"), "w") as f:
                f.write(json.dumps(json.loads(self._adapter_config)))  # known to be JSON before it is written

    def _reload(self, weights) -> set[str]:
        """Run the Worker's `reload_weights` (it sets vLLM's config context) and return the names
        the model's `load_weights` reports loading (vLLM's reload drops them)."""
        model = self.model_runner.get_model()
        loaded: set[str] = set()
        original = model.load_weights

        def recording(weights_iterator):
            names = original(weights_iterator)
            loaded.update(names or ())
            return names

        model.load_weights = recording  # an instance attribute, over the class's method
        quiet = _NoLayerwiseWarning()
        layerwise = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        layerwise.addFilter(quiet)
        try:
            self.reload_weights(weights_iterator=weights)
        finally:
            del model.load_weights
            layerwise.removeFilter(quiet)
        return loaded

    def _tied_lm_head(self) -> tuple:
        """(lm_head, embedding) when they are tied, else (None, None). No checkpoint tensor names a
        tied lm_head, so the reload skips its post-load processing; on CPU that packs the weight
        for the logits GEMM, and logits kept using the old packed copy (measured: 0.8 logprob
        error). On GPU nothing is packed and re-processing is a no-op."""
        model = self.model_runner.get_model()
        head = getattr(model, "lm_head", None)
        if not getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False) \
                or getattr(head, "quant_method", None) is None:
            return None, None
        return head, next((m for m in model.modules() if m is not head and getattr(m, "weight", None) is head.weight),
                          None)
