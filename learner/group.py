"""LearnerGroup: N LearnerWorker Ray actors forming one torch.distributed world; fans calls out.

A rank that dies stops every call at once with `LearnerLost` (naming the rank), instead of
waiting on the survivors, who would block in a collective with it: the run cannot go on without
a rank, and resumes from its last checkpoint."""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import RayActorError

from learner.batch import TrainBatch, pad_to_multiple
from learner.spec import LearnerSpec
from learner.worker import LearnerWorker

SHUTDOWN_GRACE_S = 30.0  # for the ranks to leave their process groups before they are killed


class LearnerLost(RuntimeError):
    """A learner rank died; the learner's state is gone past the last checkpoint."""


class LearnerGroup:
    def __init__(self, num_ranks: int, actor_options: list[dict[str, Any]], spec: LearnerSpec):
        """`actor_options[r]` are Ray options for rank r (resources, scheduling strategy); every rank
        is set up from `spec` (kept as `self.spec`: what the ranks were told)."""
        self.spec = spec
        remote = ray.remote(LearnerWorker)
        self.workers = [remote.options(**actor_options[r]).remote(r, num_ranks) for r in range(num_ranks)]
        master = ray.get(self.workers[0].address.remote())
        ray.get([w.setup.remote(master, spec) for w in self.workers])

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One update on a batch that splits evenly over the ranks; returns rank 0's metrics."""
        n = len(self.workers)
        return self._get([w.train_step.remote(batch.shard(r, n)) for r, w in enumerate(self.workers)])[0]

    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Per-sequence completion logprobs under the current policy."""
        return self._per_sequence("logprobs", batch)

    def reference_kl(self, batch: TrainBatch, estimator: str) -> list[float]:
        """Per-sequence summed KL to the reference model (for KL-in-reward)."""
        return self._per_sequence("reference_kl", batch, estimator)

    def _per_sequence(self, method: str, batch: TrainBatch, *args: Any) -> list:
        """Fan a per-sequence query out over the ranks (any batch size: padded, then trimmed)."""
        n = len(self.workers)
        padded, _ = pad_to_multiple(batch, n)
        parts = self._get([getattr(w, method).remote(padded.shard(r, n), *args) for r, w in enumerate(self.workers)])
        return [x for part in parts for x in part][:len(batch)]

    def save_checkpoint(self, path: str) -> None:
        """Every rank writes its shards of model and optimizer, and its schedule and RNG, under `path`."""
        self._get([w.save_checkpoint.remote(path) for w in self.workers])

    def write_markers(self, directory: str, name: str) -> list[str]:
        """Every rank writes a marker file under `directory` as its node sees it; their node addresses."""
        return self._get([w.write_marker.remote(directory, name) for w in self.workers])

    def load_checkpoint(self, path: str) -> None:
        self._get([w.load_checkpoint.remote(path) for w in self.workers])

    def _get(self, refs: list[ray.ObjectRef]) -> list:
        """Results of one call per rank, in rank order; LearnerLost as soon as any rank has died."""
        rank_of = {ref: r for r, ref in enumerate(refs)}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            try:
                ray.get(done[0])
            except RayActorError as err:
                raise LearnerLost(f"learner rank {rank_of[done[0]]} died ({type(err).__name__})") from err
        return ray.get(refs)

    def offload(self, what: str = "all") -> list[str]:
        """Every rank's `LearnerWorker.offload(what)`."""
        return ray.get([w.offload.remote(what) for w in self.workers])

    def reload(self) -> list[str]:
        return ray.get([w.reload.remote() for w in self.workers])

    def weight_manifest(self) -> list[tuple[str, tuple[int, ...]]]:
        return ray.get(self.workers[0].weight_manifest.remote())

    def adapter_config(self) -> str | None:
        """peft's adapter_config.json when the engines load a LoRA adapter (`learner.lora.sync=adapter`)."""
        return ray.get(self.workers[0].adapter_config.remote())

    def reference_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Per-sequence completion logprobs under the reference model (LoRA: adapters disabled)."""
        return self._per_sequence("reference_logprobs", batch)

    def join_weight_group(self, **kwargs: Any) -> list[ray.ObjectRef]:
        """Start joining (rank 0 hosts the group); returns refs to wait on with the engines' joins."""
        return [w.join_weight_group.remote(**kwargs) for w in self.workers]

    def broadcast_weights(self) -> list[ray.ObjectRef]:
        """Start a broadcast; ref 0 resolves to rank 0's per-bucket checksums."""
        return [w.broadcast_weights.remote() for w in self.workers]

    def save_pretrained(self, path: str, driver_node: str | None = None, merge: bool = False) -> None:
        """The policy and tokenizer into `path` on the driver's node (`driver_node`: its Ray node
        id, by default this process's), fetched file by file when the learner runs on another node.
        With LoRA: the adapter, and with `merge` the merged model (`learner.export`)."""
        from pathlib import Path

        node = driver_node or ray.get_runtime_context().get_node_id()
        names = ray.get([w.save_pretrained.remote(path, node, merge) for w in self.workers])[0]
        if names:
            for name in names:
                (Path(path) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(path) / name).write_bytes(ray.get(self.workers[0].read_export.remote(name)))
            ray.get(self.workers[0].drop_export.remote())

    def shutdown(self) -> None:
        """Every rank leaves its groups (up to SHUTDOWN_GRACE_S), then every worker is killed: a dead
        or hung rank does not keep the others alive."""
        refs = [w.shutdown.remote() for w in self.workers]
        ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_GRACE_S)
        for w in self.workers:
            ray.kill(w)
