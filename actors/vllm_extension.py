"""vLLM worker extension: join the weight-broadcast group and load what the learner sends.

vLLM mixes this class into every worker of an engine (`worker_extension_cls`); the rollout actor
calls its methods through `LLM.collective_rpc`, so with tensor parallelism every TP worker joins
the group and receives full tensors, and vLLM's own `load_weights` shards them.

Received buckets are streamed straight into the worker's `reload_weights` (one bucket alive at a time, so a
sync needs at most one bucket of extra memory) and checksummed on the way for the learner to
compare.
"""

from __future__ import annotations

import torch

from learner.weights import TensorSpec, checksum, make_transport, plan_buckets, unpack


class WeightSyncExtension:
    """Methods added to vLLM's Worker; `self.rank`, `self.device`, `self.model_runner` are vLLM's."""

    def join_weight_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                          generation: int, timeout_s: float, manifest: list[tuple[str, tuple[int, ...]]],
                          dtype: str, bucket_bytes: int) -> int:
        """Join generation `generation` of the broadcast group as rank `rank_offset + self.rank`."""
        old = getattr(self, "_weight_transport", None)
        if old is not None:
            old.close()
        self._wire_dtype = getattr(torch, dtype)
        specs = [TensorSpec(name, tuple(shape)) for name, shape in manifest]
        element_size = torch.empty((), dtype=self._wire_dtype).element_size()
        self._buckets = plan_buckets(specs, bucket_bytes, element_size)
        rank = rank_offset + self.rank
        self._weight_transport = make_transport(backend, host, port, rank, world_size, generation, timeout_s)
        return rank

    def receive_weights(self) -> list[tuple[int, int]]:
        """Receive every bucket, load it into the model, return one checksum per bucket."""
        sums: list[tuple[int, int]] = []

        def stream():
            for bucket in self._buckets:
                numel = sum(spec.numel for spec in bucket)
                buf = torch.empty(numel, dtype=self._wire_dtype, device=self.device)
                self._weight_transport.recv(buf)
                sums.append(checksum(buf))
                yield from unpack(buf, bucket)

        self.reload_weights(weights_iterator=stream())  # the Worker's: it sets vLLM's config context
        self._refresh_tied_lm_head()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # loaded before the engine samples again
        return sums

    def _refresh_tied_lm_head(self) -> None:
        """Re-run the tied lm_head's weight processing after a reload.

        With tied embeddings no checkpoint tensor names the lm_head, so the layerwise reload
        skips its post-load processing; on CPU that processing packs the weight for the logits
        GEMM, so logits kept using the old packed copy while the embedding changed (measured:
        0.8 logprob error). On GPU the call is a no-op."""
        model = self.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        tied = getattr(self.model_runner.model_config.hf_config, "tie_word_embeddings", False)
        method = getattr(lm_head, "quant_method", None)
        if tied and method is not None:
            method.process_weights_after_loading(lm_head)
