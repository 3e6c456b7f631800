"""LearnerWorker: one rank of the learner world — an FSDP2-sharded causal LM and its optimizer.

Each rank is a Ray actor (see `learner.group`), set up from one `learner.spec.LearnerSpec`.
Ranks form one torch.distributed world (gloo on CPU, NCCL on GPU); the policy is sharded with
FSDP2 (`fully_shard` per decoder layer, then the root), with bf16 compute / fp32 reductions on
GPU and fp32 on CPU. One `train_step` consumes
this rank's shard of a batch: optionally split into `num_minibatches` optimizer steps, each
accumulated over micro-batches bounded by a token budget, so memory does not grow with the batch.

The worker knows nothing about the algorithm: an objective (`learner.objectives`) turns token
logprobs into a loss. Losses are normalised by global (all-rank, whole mini-batch) token and
sequence counts and multiplied by the world size (FSDP averages gradients), so the gradient
equals that of the full batch's loss, whatever the micro-batching.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

import torch
import torch.distributed as dist

from common.gpu import cuda_problem
from common.models import resolve_on_node
from learner.batch import Padded, TrainBatch, micro_batches
from learner.batch import pack as pack_rows
from learner.batch import pad, prompt_rows, row_lengths
from learner.hf_names import CheckpointNames
from learner.lora import LoRANames
from learner.logprobs import chunked_logprobs
from learner.objectives import Micro
from learner.spec import LearnerSpec
from learner.stats import StepStats
from learner.weights import (TensorSpec, WeightTransport, device_checksum, make_transport, pack, plan_buckets,
                             read_checksums)

log = logging.getLogger("raygrpo")


class LearnerWorker:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    def address(self) -> str:
        """host:port where this rank can host the torch.distributed rendezvous."""
        import ray

        return f"{ray.util.get_node_ip_address()}:{free_port()}"

    def setup(self, master: str, spec: LearnerSpec) -> None:
        """Join the ranks' world at `master` (rank 0's `address`), load the policy (and the reference
        model when the objective wants one) and build the optimizer, all as `spec` says."""
        import ray

        rank, world_size = self.rank, self.world_size
        self.device = choose_device(ray.get_gpu_ids())
        # NCCL for CUDA tensors; gloo alongside it for the small CPU all-reduces (counts, metrics).
        backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # Ray's CUDA_VISIBLE_DEVICES shows this rank one GPU
        else:
            torch.set_num_threads(max(1, spec.cpu_threads))
        dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=world_size)
        self.model_path = model_path = resolve_on_node(spec.model_path)
        torch.manual_seed(spec.seed)
        self.objective, self.temperature, self.logits_chunk = spec.objective, spec.temperature, spec.logits_chunk
        self.grad_clip, self.micro_batch_tokens = spec.grad_clip, spec.micro_batch_tokens
        self.num_minibatches = spec.num_minibatches
        mp = spec.mixed_precision and self.device.type == "cuda"
        if mp and not torch.cuda.is_bf16_supported():
            raise RuntimeError("this GPU has no bf16: set learner.mixed_precision=false (and model.dtype=float16)")
        self.lora = spec.lora if spec.lora.enabled else None  # the reference is then the model without adapters
        self.model = self._load(model_path, mp, spec.gradient_checkpointing, trainable=True, lora=self.lora)
        self.ref = self._load(model_path, mp, False, trainable=False) \
            if spec.objective.needs_reference_model and self.lora is None else None
        # what the engines load (learner.hf_names; learner.lora: merged weights or the adapter alone)
        self.names = LoRANames(self.model, spec.lora.sync) if self.lora else CheckpointNames(self.model)
        self.pad_id = self.model.config.pad_token_id or 0
        self._choose_layout(spec.share_prompts, torch.bfloat16 if mp else torch.float32)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters alone
        self.optimizer = torch.optim.AdamW(self.trainable, lr=spec.lr, betas=tuple(spec.betas),
                                           weight_decay=spec.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(spec.warmup_steps, spec.schedule, spec.total_steps * spec.num_minibatches))
        self.transport: WeightTransport | None = None

    def _load(self, path: str, mixed_precision: bool, checkpointing: bool, trainable: bool, lora=None):
        """The model, FSDP2-sharded: rank 0 reads the checkpoint, the other ranks build it on the meta
        device and receive their shards by broadcast (an 8-rank node holds one full copy, not 8).
        With `lora` (a `LoRASpec`) peft's adapters are injected before sharding (rank 0 initialises
        them, the others receive them), and only they require gradients."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.rank == 0:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
        blocks = set(getattr(model, "_no_split_modules", None) or ())  # the decoder layer classes
        if checkpointing:
            model.gradient_checkpointing_enable()
        if lora is not None:
            from learner.lora import wrap

            model = wrap(model, lora)
            if checkpointing:
                model.enable_input_require_grads()  # the frozen embeddings' output feeds checkpointed layers
        full = model.state_dict() if self.rank == 0 else {}
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
            else MixedPrecisionPolicy()
        layers = [m for m in model.modules() if type(m).__name__ in blocks]
        if not layers:
            raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard")
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # rank 0's shards move to its device; never the full model
        if self.rank != 0:
            model.to_empty(device=self.device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():  # non-persistent ones (rotary inv_freq) are in no state dict
            dist.broadcast(buffer.data, src=0)
        del full
        model.train(trainable)
        if lora is None:
            model.requires_grad_(trainable)
        return model

    # ---------------------------------------------------------------- forward

    def _choose_layout(self, share_prompts: bool, compute_dtype: torch.dtype) -> None:
        """Shared-prompt rows need an attention that takes a 4D float mask (sdpa, eager; not flash)."""
        impl = self.model.config._attn_implementation
        self.share_prompts, self.compute_dtype = share_prompts and impl in ("sdpa", "eager"), compute_dtype
        if self.rank == 0:  # a warning where sharing was asked for but this attention cannot do it
            (log.warning if share_prompts and not self.share_prompts else log.info)(
                "learner: %s (share_prompts=%s, attention %s)", "one packed row per prompt group"
                if self.share_prompts else "one padded row per sequence", share_prompts, impl)

    def _micro(self, batch: TrainBatch, rows: list[list[int]]) -> tuple[list[int], Padded]:
        """Sequence indices in window order ([b]) and the micro-batch of these rows."""
        idx = [i for row in rows for i in row]
        if self.share_prompts:
            return idx, pack_rows(batch, rows, self.pad_id, self.device, self.compute_dtype)
        return idx, pad(batch.select(idx), self.pad_id, self.device)

    def _forward(self, model, padded: Padded, with_entropy: bool, entropy_grad: bool):
        """Token logprobs (and entropy) [b, T] over the scored window; logits only for that window
        ([rows, L - start, V]), gathered per sequence by `padded.index` in the shared layout."""
        keep = padded.input_ids.shape[1] - padded.start
        extra = {} if padded.position_ids is None else {"position_ids": padded.position_ids}
        out = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, logits_to_keep=keep, **extra)
        kind = ("grad" if entropy_grad else "metric") if with_entropy else ""
        return chunked_logprobs(out.logits, padded.targets, self.temperature, self.logits_chunk, kind, padded.index)

    def logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Current policy's logprobs of each completion's tokens (evaluation, tests, IS weights)."""
        return [t.tolist() for t in self._recompute_logprobs(batch, self.model)]

    def reference_kl(self, batch: TrainBatch, estimator: str) -> list[float]:
        """Σ_t KL_t(behaviour ‖ reference) per sequence over the policy's tokens (a multi-turn
        trajectory's observations are no sample of the policy), with the engine's logprobs as behaviour."""
        from learner.grpo import kl_penalty

        ref = self._reference_logprobs(batch)
        return [float((kl_penalty(torch.tensor(lp), r, estimator) * torch.tensor(batch.policy_tokens(i))).sum())
                if lp else 0.0 for i, (lp, r) in enumerate(zip(batch.rollout_logprobs, ref))]

    def _reference_logprobs(self, batch: TrainBatch) -> list[torch.Tensor]:
        """The reference model's logprobs: the frozen copy, or with LoRA the policy, adapters disabled."""
        if self.lora is None:
            return self._recompute_logprobs(batch, self.ref)
        with self.model.disable_adapter():
            return self._recompute_logprobs(batch, self.model)

    def reference_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """The reference model's logprobs of each completion's tokens (tests, evaluation)."""
        return [t.tolist() for t in self._reference_logprobs(batch)]

    @torch.no_grad()
    def _recompute_logprobs(self, batch: TrainBatch, model) -> list[torch.Tensor]:
        """Per-sequence logprobs of the completion tokens under `model` (no grad; LoRA dropout off)."""
        if self.lora is not None and self.lora.dropout > 0 and model.training:
            model.eval()
            try:
                return self._recompute_logprobs(batch, model)
            finally:
                model.train()
        result: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        for rows in self._micro_plan(batch):
            if not rows:
                self._dummy_forward(model, batch)
                continue
            idx, padded = self._micro(batch, rows)
            logp, _ = self._forward(model, padded, False, False)
            for row, i in enumerate(idx):
                result[i] = logp[row][padded.completion[row] > 0].cpu()
        return result

    def _dummy_forward(self, model, batch: TrainBatch) -> None:
        """Keep FSDP collectives in step on a rank with fewer micro-batches than its peers."""
        padded = pad(batch.select([0]), self.pad_id, self.device)
        logp, _ = self._forward(model, padded, False, False)
        if torch.is_grad_enabled():
            (logp.sum() * 0.0).backward()

    def _micro_plan(self, batch: TrainBatch) -> list[list[list[int]]]:
        """Micro-batches of rows of sequence indices (`prompt_rows`: one sequence per row, or a
        prompt group per row when sharing), rows × longest row within the token budget; padded
        with empty micro-batches to the largest count of any rank."""
        rows = prompt_rows(batch, self.micro_batch_tokens, self.share_prompts)
        lengths = row_lengths(batch, rows)
        count = torch.tensor([len(micro_batches(lengths, self.micro_batch_tokens))])
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return [[rows[r] for r in mb] for mb in micro_batches(lengths, self.micro_batch_tokens, int(count))]

    def _global(self, *values: float, op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op)
        return t.tolist()

    # ---------------------------------------------------------------- training

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """Consume this rank's shard: `num_minibatches` optimizer steps; returns rank-0 metrics."""
        old = self._recompute_logprobs(batch, self.model) if self.num_minibatches > 1 else None
        per = len(batch) // self.num_minibatches
        stats = StepStats()
        for m in range(self.num_minibatches):
            index = list(range(m * per, (m + 1) * per))
            self._minibatch(batch.select(index), [old[i] for i in index] if old else None, stats)
        return stats.finish(self._global)

    def _minibatch(self, batch: TrainBatch, old: list[torch.Tensor] | None, stats: StepStats) -> None:
        mask_counts = [sum(batch.policy_tokens(i)) if w > 0 else 0 for i, w in enumerate(batch.loss_weights)]
        num_tokens, num_seqs = self._global(sum(mask_counts), sum(w > 0 for w in batch.loss_weights))
        self.optimizer.zero_grad(set_to_none=True)
        obj = self.objective
        # Reference logprobs in their own pass (its padding passes keep FSDP collectives in step).
        has_ref = self.ref is not None or (self.lora is not None and obj.needs_reference_model)
        ref_all = self._reference_logprobs(batch) if has_ref and obj.needs_reference else None
        plan = self._micro_plan(batch)  # the same number of micro-batches on every rank
        for i, rows in enumerate(plan):
            self._gradient_sync(i == len(plan) - 1)  # one reduce-scatter per optimizer step, not per micro-batch
            if not rows:
                self._dummy_forward(self.model, batch)
                continue
            idx, padded = self._micro(batch, rows)
            logp, entropy = self._forward(self.model, padded, True, obj.needs_entropy_grad)
            ref = _scatter(ref_all, idx, padded) if ref_all is not None else None
            old_logp = logp.detach() if old is None else _scatter(old, idx, padded)
            loss, metrics = obj(Micro(logp, old_logp, padded.mask, padded.advantages, entropy, ref,
                                      int(num_tokens), int(num_seqs), padded.rollout_logprobs))
            (loss * self.world_size).backward()
            stats.add_micro(loss, metrics, logp.detach(), entropy, padded)
        grad_norm = self._clip_and_step()
        stats.add_step(grad_norm, self.scheduler.get_last_lr()[0])

    def _gradient_sync(self, on: bool) -> None:
        """FSDP2 reduce-scatters gradients in a backward only when `on`; off, they accumulate unsharded
        on each rank until the last micro-batch's backward reduces their sum once."""
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(on)

    def _clip_and_step(self) -> float:
        """Clip, step, advance the schedule; a non-finite grad norm skips the update (all ranks agree)."""
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    # ---------------------------------------------------------------- colocation

    def offload(self, what: str = "all") -> str:
        """Move state to host memory and free the device's cached blocks (a no-op on CPU); returns
        where the weights are. "optimizer": AdamW's moments only (gradients are already freed by
        the step), before a colocated sync, which needs the weights; "all": weights too (the
        colocated engines generate meanwhile)."""
        if what not in ("optimizer", "all"):
            raise ValueError(f"offload what: 'optimizer' or 'all', not {what!r}")
        self._move(torch.device("cpu"), weights=what == "all")
        return str(next(self.model.parameters()).device)

    def reload(self) -> str:
        """Back onto this rank's device before training; returns where the weights are."""
        self._move(self.device)
        return str(next(self.model.parameters()).device)

    def _move(self, device: torch.device, weights: bool = True) -> None:
        if self.device.type == "cpu":
            return
        if weights or device.type != "cpu":
            for model in filter(None, (self.model, self.ref)):
                model.to(device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and v.dim() > 0:  # not AdamW's `step` scalars: they live on the host
                    state[k] = v.to(device, non_blocking=True)
        if device.type == "cpu":
            torch.cuda.synchronize(self.device)  # the non_blocking copies land before anyone (a checkpoint) reads them
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- checkpoints

    def write_marker(self, directory: str, name: str) -> str:
        """Write `directory/name-rank{r}` (this node's view of the run directory); returns this
        node's address, for the driver to say which node does not share its storage."""
        import ray

        os.makedirs(directory, exist_ok=True)
        node = ray.util.get_node_ip_address()
        with open(os.path.join(directory, f"{name}-rank{self.rank}"), "w") as f:
            f.write(node)
        return node

    def save_checkpoint(self, path: str) -> None:
        """Model and optimizer shards into `path`/learner (all ranks together, with
        torch.distributed.checkpoint), and this rank's LR schedule and RNG state beside them; with
        LoRA the adapters alone (`learner.rank_checkpoint`)."""
        from learner.rank_checkpoint import save

        save(self, path)

    def load_checkpoint(self, path: str) -> None:
        """Restore what `save_checkpoint` wrote (DCP reshards when the world size changed); nothing in
        the files is executed (see `learner.checkpoint_io`)."""
        from learner.rank_checkpoint import load

        load(self, path)

    # ---------------------------------------------------------------- weights out

    def weight_manifest(self) -> list[tuple[str, tuple[int, ...]]]:
        """(checkpoint name, full shape) of every tensor the engines load, in broadcast order (tied
        weights once; converted architectures by their checkpoint names, see `learner.hf_names`;
        with LoRA the merged weights or the adapter's tensors, see `learner.lora`)."""
        return self.names.manifest()

    def adapter_config(self) -> str | None:
        """With LoRA synced as an adapter: peft's adapter_config.json for the engines; else None."""
        from learner.lora import adapter_config

        return adapter_config(self.model) if self.lora and self.names.kind == "adapter" else None

    def join_weight_group(self, host: str, port: int, world_size: int, generation: int, timeout_s: float,
                          backend: str, dtype: str, bucket_bytes: int, secret: str,
                          roots: list[str] | None = None, manifest: list | None = None) -> None:
        """Rank 0 joins the broadcast group as its root, other ranks only remember the plan; with
        `roots` (shared memory, colocated) rank r is the root of its own pair at `roots[r]`.
        `secret`: the group's, from the driver (see `learner.group_store.join_store`). `manifest`: what
        to send, the engines' plan too (default: `weight_manifest()`)."""
        self.wire_dtype = getattr(torch, dtype)
        element_size = torch.empty((), dtype=self.wire_dtype).element_size()
        specs = [TensorSpec(n, tuple(s)) for n, s in (manifest if manifest is not None else self.weight_manifest())]
        self.buckets = plan_buckets(specs, bucket_bytes, element_size)
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if roots is not None:
            if self.rank >= len(roots) or not roots[self.rank]:
                return
            host, port = roots[self.rank].rsplit(":", 1)
        elif self.rank != 0:
            return
        self.transport = make_transport(backend, host, int(port), 0, world_size, generation, timeout_s, secret=secret)

    def broadcast_weights(self) -> list[tuple[int, int]]:
        """Gather full tensors bucket by bucket (all ranks); the ranks holding a transport send them.
        A failed send (a receiver died) closes the transport, so the other receivers fail at once
        instead of waiting out their timeout, and is raised only after every bucket was gathered:
        the other learner ranks are never left blocked in a gather, and the sync can be retried.

        Buckets are packed into one reused buffer, on CPU with one thread: the copies are
        memory-bound, and the engines load the previous bucket meanwhile (on 2 cores, two threads
        per side made packing ~3x slower: at every copy a thread waits for one descheduled)."""
        sizes = [sum(s.numel for s in bucket) for bucket in self.buckets]
        space = torch.empty(max(sizes, default=0), dtype=self.wire_dtype, device=self.device) \
            if self.transport is not None else None
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        sums, failed = [], None
        try:
            with torch.no_grad():
                wanted = {spec.name for bucket in self.buckets for spec in bucket}
                stream = self.names.stream(self.model, wanted, self.wire_dtype, _full)
                for bucket, numel in zip(self.buckets, sizes):
                    full = [_named(next(stream), spec.name) for spec in bucket]
                    if space is not None and failed is None:
                        buf = pack(full, numel, self.wire_dtype, self.device, out=space)
                        try:
                            self.transport.send(buf)  # done with `buf` before the next pack writes it
                        except Exception as err:  # a receiver died: stop sending, release the others
                            failed = err
                            self.transport.close()
                            continue
                        sums.append(device_checksum(buf))
        finally:
            torch.set_num_threads(threads)
        if failed is not None:  # raised after the loop, so the other ranks' gathers complete
            raise failed
        return read_checksums(sums)  # the one host wait of the sync

    def save_pretrained(self, path: str, driver_node: str, merge: bool = False) -> list[str]:
        """Write the policy and its tokenizer (all ranks gather, rank 0 writes; `learner.export`: a HF
        directory, with LoRA the peft adapter, and the merged model too with `merge`): into `path`
        when rank 0 runs on the driver's node (Ray node id `driver_node`), else into a temporary
        directory whose files the driver fetches with `read_export` (returned: their paths)."""
        import tempfile

        import ray
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from learner.export import write_policy

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names: list[str] = []
        if self.rank == 0:
            local = ray.get_runtime_context().get_node_id() == driver_node
            self.export = path if local else tempfile.mkdtemp(prefix="raygrpo-policy-")
            written = write_policy(self.model, state, self.export, self.model_path, self.lora is not None, merge)
            names = [] if local else written
        dist.barrier()
        return names

    def read_export(self, name: str) -> bytes:
        """One file of the policy exported by `save_pretrained` (at most one 2 GB shard)."""
        with open(f"{self.export}/{name}", "rb") as f:
            return f.read()

    def drop_export(self) -> None:
        import shutil

        shutil.rmtree(self.export, ignore_errors=True)

    def shutdown(self) -> None:
        """Leave the weight-broadcast group (its end of the weight sync: an NCCL communicator is
        aborted, not left waiting on engines already gone), then this rank's world."""
        if getattr(self, "transport", None) is not None:
            self.transport.close()
            self.transport = None
        if dist.is_initialized():
            dist.destroy_process_group()


def choose_device(gpu_ids: list, problem: Callable[[], str | None] = cuda_problem) -> torch.device:
    """cuda:0 when Ray granted this actor a GPU (its CUDA_VISIBLE_DEVICES then lists that one), else
    the CPU — even where GPUs are visible: since Ray 2.5x a zero-GPU actor still sees them all. With
    RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES Ray leaves every GPU visible: the granted one by its
    index. A granted GPU that torch cannot use (a driver too old for its CUDA) raises, saying so."""
    if not gpu_ids:
        return torch.device("cpu")
    why = problem()
    if why:
        raise RuntimeError(f"learner rank granted GPU {gpu_ids}: {why}")
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):  # every GPU visible: take the granted one
        return torch.device("cuda", int(gpu_ids[0]))
    return torch.device("cuda", 0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _named(item: tuple[str, torch.Tensor], expected: str) -> torch.Tensor:
    name, tensor = item
    if name != expected:
        raise RuntimeError(f"weight sync out of order: {name} where the plan has {expected}")
    return tensor


def _full(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def _scatter(per_sequence: list[torch.Tensor], idx: list[int], padded) -> torch.Tensor:
    """Place per-sequence completion logprobs into the micro-batch's window layout."""
    out = torch.zeros_like(padded.mask)
    for row, i in enumerate(idx):
        out[row][padded.completion[row] > 0] = per_sequence[i].to(out.device)
    return out


def _lr_lambda(warmup: int, schedule: str, total: int):
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    return factor
