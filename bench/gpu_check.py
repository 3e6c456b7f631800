"""One prepared check of the GPU paths on one lent GPU (issue 19): one JSON line per check.

    python bench/gpu_check.py [--only NAME,NAME...] > gpu_check.jsonl

On the lent machine (the device tool's `run`, with this repo as the working tree):

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py > $OUT/gpu_check.jsonl

Each line is {"check": name, "ok": bool, ...figures..., "seconds": t}, or {"check": name,
"skipped": why}; a failing check prints its error (and the tail of its traceback) and the script
goes on; the exit status is 1 if any check failed. Sized for a few minutes on one H200 (an
estimate: it has not run on a GPU yet), well inside the 8 minutes it is allowed; `--only` runs a
subset. It sets CUBLAS_WORKSPACE_CONFIG=:4096:8 (deterministic cuBLAS, for `worker_offload`'s
bit-for-bit comparison) unless the environment sets it.

Needs torch (the GPU machine's image has it) and, for the checks on a model (`shared_prompts`,
`worker_offload`, `learner_mfu`), transformers with tokenizers and safetensors: without them those
checks say "skipped: no transformers" (on the GPU machine transformers is in the image, or can be
carried as wheels: /work/.library/device/README.md). It needs NO vLLM and NO Ray: none of our
modules it imports (`learner.weights`, `learner.logprobs`, `learner.batch`, `learner.worker`,
`learner.spec`, `learner.objectives`, `common.models`) imports either at module level;
`LearnerWorker.setup` imports `ray` inside the function only for `ray.get_gpu_ids()`, so before
importing ours this script puts a tiny stand-in `ray` module into `sys.modules` (`_install_ray_stub`:
`get_gpu_ids()` is [0] when CUDA is available, else []), and a `None` under "vllm" so that any
import of vLLM fails loudly instead of loading it. The real Ray is never imported, even where it
is installed.

On a machine without CUDA (CI's, a laptop) every check that can runs a small CPU version (gloo
instead of NCCL, shared-memory files instead of CUDA IPC, fp32 instead of bf16 where the learner
runs fp32 on CPU), and the GPU-only measurements say {"skipped": "no CUDA"}. CI never runs this
script: it is not a test, and nothing in the test suite depends on it.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import importlib.machinery
import json
import os
import queue
import shutil
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for `worker_offload`
os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # as in the job's environment (learner.weights)

import torch  # noqa: E402

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s, the vendor's datasheet (the same as an H100 SXM)
H200_BF16_MEASURED = 790e12  # an 8192^3 bf16 matmul on random data, measured on these machines (KINDS.md)
TRANSPORT_TIMEOUT_S = 60.0  # a lost peer fails the transport checks within a minute, not the default 300 s
CHECK_LIMIT_S = 180  # per check: faulthandler prints every thread's stack if one runs longer (a hang)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", 0) if CUDA else torch.device("cpu")
GiB = 2 ** 30


# --------------------------------------------------------------------------- no Ray, no vLLM


def _install_ray_stub() -> None:
    """A stand-in `ray` in sys.modules, so `LearnerWorker.setup`'s `import ray` never loads the real
    one (absent on the GPU machine): only `get_gpu_ids` is used there, and it says what Ray would
    have granted this process (one GPU when there is one). `vllm` is blocked: importing it raises."""
    stub = types.ModuleType("ray")
    stub.__spec__ = importlib.machinery.ModuleSpec("ray", None)  # importlib.util.find_spec works on it
    stub.__version__ = "0+gpu_check_stub"
    stub.get_gpu_ids = lambda: [0] if CUDA else []
    stub.IS_GPU_CHECK_STUB = True
    sys.modules["ray"] = stub
    sys.modules["vllm"] = None  # `import vllm` -> ImportError


def _have_transformers() -> bool:
    try:
        import tokenizers  # noqa: F401  (the tiny model's byte-level tokenizer)
        import transformers  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken: the model checks are skipped
        return False
    return True


# --------------------------------------------------------------------------- helpers


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe) of two tensors of one dtype and shape, on any devices."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().cpu().contiguous().reshape(-1).view(torch.uint8))


def _reference_checksum(t: torch.Tensor) -> tuple[int, int]:
    """`learner.weights.checksum` as specified, in numpy: the bytes as little-endian uint64 words
    (the last partial word zero-padded), (sum, sum of word_i * (i % 127 + 1)) mod 2^64, signed."""
    import numpy as np

    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    raw += b"\0" * (-len(raw) % 8)
    words = np.frombuffer(raw, dtype="<u8")
    weights = (np.arange(words.size, dtype=np.uint64) % np.uint64(127)) + np.uint64(1)
    with np.errstate(over="ignore"):
        total = int(words.sum(dtype=np.uint64))
        weighted = int((words * weights).sum(dtype=np.uint64))

    def signed(x: int) -> int:
        return x - 2 ** 64 if x >= 2 ** 63 else x

    return signed(total), signed(weighted)


def _tiny_model_dir(root: Path) -> str:
    """The tests' tiny Qwen2 (`builtin:tiny-qwen2`: hidden 128, 2 layers, 2 heads of dim 64, 1 KV
    head, a byte-level tokenizer of 259 ids, tied embeddings), written once into `root`."""
    from common.models import build_tiny_qwen2

    path = root / "tiny-qwen2"
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        build_tiny_qwen2(path)
    return str(path)


GROUPS = [(7, [3, 9, 5, 1]), (12, [6, 11, 8, 2, 4]), (4, [10, 7, 3, 6])]  # tests/test_shared_prompts.py's


def _make_batch(seed: int = 0):
    """tests/test_shared_prompts.py's batch: groups of different prompt and completion lengths, and
    the driver's loss-weight-0 padding copy of the last sequence at the end."""
    import random

    from learner.batch import TrainBatch

    rng = random.Random(seed)
    fields: list[list] = [[], [], [], [], []]  # prompt_ids, completion_ids, rollout_logprobs, advantages, weights
    for p, lens in GROUPS:
        prompt = [rng.randrange(3, 250) for _ in range(p)]
        for n in lens:
            row = (prompt, [rng.randrange(3, 250) for _ in range(n)], [-rng.random() * 5 for _ in range(n)],
                   rng.uniform(-1.5, 1.5), 1.0)
            for field, value in zip(fields, row):
                field.append(value)
    for field in fields:  # the padding copy
        field.append(field[-1])
    fields[4][-1] = 0.0
    return TrainBatch(*fields)


def _worker(model_dir: str, **overrides):
    """One LearnerWorker of world size 1 in this process, set up as `learner.group` would (the Ray
    stub grants it the GPU when there is one): it initialises its own default process group
    (gloo on CPU, cpu:gloo,cuda:nccl on GPU) at 127.0.0.1; `shutdown` destroys it."""
    from learner.objectives import GRPOObjective
    from learner.spec import LearnerSpec
    from learner.worker import LearnerWorker, free_port

    spec = dict(model_path=model_dir, lr=1e-3, micro_batch_tokens=40, objective=GRPOObjective(entropy_coef=0.01),
                temperature=0.8, logits_chunk=5, cpu_threads=max(1, min(2, torch.get_num_threads())),
                mixed_precision=True, seed=0, total_steps=10)
    spec.update(overrides)
    w = LearnerWorker(0, 1)
    w.setup(f"127.0.0.1:{free_port()}", LearnerSpec(**spec))
    return w


def _params(worker) -> dict[str, torch.Tensor]:
    from learner.worker import _full

    return {n: _full(p).detach().cpu().clone() for n, p in worker.model.named_parameters()}


# --------------------------------------------------------------------------- 1. checksum / pack / unpack


def check_checksum_pack():
    """checksum, pack (one reused buffer, casting), unpack and plan_buckets on CUDA give exactly
    what they give on the CPU and what the checksum's definition gives (a numpy reference): bf16
    and fp32, odd lengths, views at odd offsets (not 8-byte aligned: the clone path), strided views.

    Only a GPU shows it: the sender checksums on its GPU and the engine on its own, so the two sums
    must agree across devices; CUDA's reductions and casts are other kernels than the CPU's (on
    the CPU this compares the CPU with the reference alone)."""
    from learner.weights import TensorSpec, checksum, pack, plan_buckets, unpack

    g = torch.Generator().manual_seed(0)
    cases, bad = 0, []
    for dtype in (torch.bfloat16, torch.float32):
        for n in (1, 3, 7, 127, 128, 255, 1001, 65537, 1_000_003):
            base = torch.randn(n + 8, generator=g).to(dtype)
            base[0] = float("nan")  # odd bit patterns are bytes too
            for off in (0, 1, 3):
                t = base[off:off + n]
                want = _reference_checksum(t)
                got = {"cpu": checksum(t)}
                if CUDA:
                    got["cuda"] = checksum(base.to(DEVICE)[off:off + n])  # the same odd offset on the GPU
                cases += 1
                for where, value in got.items():
                    if value != want:
                        bad.append(f"checksum {dtype} n={n} off={off} on {where}: {value} != {want}")
        strided = torch.randn(33, 17, generator=g).to(dtype).t()[1:]  # non-contiguous
        cases += 1
        values = [checksum(strided)] + ([checksum(strided.to(DEVICE))] if CUDA else [])
        if any(v != _reference_checksum(strided) for v in values):
            bad.append(f"checksum of a strided {dtype} view: {values}")

    # pack / unpack: tensors of mixed dtypes (cast on packing), odd shapes, odd offsets, strides
    sources = []
    for i in range(40):
        rows, cols = 1 + (i * 7) % 13, 1 + (i * 11) % 29
        full = torch.randn(rows * cols + 5, generator=g).to(torch.float32 if i % 2 else torch.bfloat16)
        t = full[i % 5:i % 5 + rows * cols].view(rows, cols)
        sources.append(t.t() if i % 3 == 0 else t)
    specs = [TensorSpec(f"t{i}", tuple(t.shape)) for i, t in enumerate(sources)]
    buckets_seen = 0
    for wire in (torch.bfloat16, torch.float32):
        buckets = plan_buckets(specs, 1000, torch.empty((), dtype=wire).element_size())
        buckets_seen += len(buckets)
        tensors = dict(zip((s.name for s in specs), sources))
        largest = max(sum(s.numel for s in b) for b in buckets)
        spaces = {"cpu": torch.empty(largest, dtype=wire)}
        if CUDA:
            spaces["cuda"] = torch.empty(largest, dtype=wire, device=DEVICE)
        for k, bucket in enumerate(buckets):
            numel = sum(s.numel for s in bucket)
            expected = torch.cat([tensors[s.name].reshape(-1).to(wire) for s in bucket])
            packed = {}
            for where, space in spaces.items():
                buf = pack([tensors[s.name].to(space.device) for s in bucket], numel, wire, space.device, out=space)
                packed[where] = buf
                if not _same_bits(buf, expected):
                    bad.append(f"pack bucket {k} ({wire}) on {where} differs from concatenation")
                if checksum(buf) != _reference_checksum(expected):
                    bad.append(f"checksum of packed bucket {k} ({wire}) on {where}")
                for name, view in unpack(buf, bucket):
                    if not _same_bits(view, tensors[name].to(wire)):
                        bad.append(f"unpack {name} ({wire}) on {where}")
            if CUDA and checksum(packed["cuda"]) != checksum(packed["cpu"]):
                bad.append(f"bucket {k} ({wire}): CUDA and CPU checksums differ")
            fresh = pack([tensors[s.name] for s in bucket], numel, wire, "cpu")  # out=None: a new buffer
            if not _same_bits(fresh, expected):
                bad.append(f"pack without out, bucket {k}")
    return dict(ok=not bad, checksum_cases=cases, buckets=buckets_seen, devices=["cpu"] + (["cuda"] if CUDA else []),
                errors=bad[:10])


# --------------------------------------------------------------------------- 2. shared-memory transport


def _shared_receiver(host, port, secret, plan, wire_name, seed, results):
    """Rank 1 of the SharedTransport pair, in its own (spawned) process: receive every bucket into
    one reused buffer, checksum it, and compare every unpacked tensor with its regenerated value."""
    try:
        import torch

        from learner.weights import TensorSpec, make_transport, checksum, unpack

        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        wire = getattr(torch, wire_name)
        buckets = [[TensorSpec(n, tuple(s)) for n, s in b] for b in plan]
        transport = make_transport("shared", host, port, 1, 2, 0, TRANSPORT_TIMEOUT_S, secret=secret)
        space = torch.empty(max(sum(s.numel for s in b) for b in buckets), dtype=wire, device=device)
        sums, wrong, index = [], 0, 0
        for bucket in buckets:
            buf = space[:sum(s.numel for s in bucket)]
            transport.recv(buf)
            sums.append(list(checksum(buf)))
            for _, view in unpack(buf, bucket):
                if not torch.equal(view, _transport_tensor(index, view.shape, device).to(wire)):
                    wrong += 1
                index += 1
        transport.close()
        results.put({"sums": sums, "wrong": wrong})
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        results.put({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-1500:]})


def _transport_tensor(i: int, shape, device) -> torch.Tensor:
    """Tensor i of the transport check, the same on both sides (seeded on its device)."""
    g = torch.Generator(device=device).manual_seed(1000 + i)
    return torch.randn(tuple(shape), generator=g, device=device)


def check_shared_transport():
    """SharedTransport ("shared" backend: CUDA IPC handles on GPU, shared-memory files on CPU) from
    this process to a spawned one: ~200 buckets of several tensors each, packed into one reused
    buffer on each side; per-bucket checksums on both sides equal, every tensor received exact.

    Only a GPU shows the CUDA IPC path (`_share`/`_open` with `storage._share_cuda_` and
    `rebuild_cuda_tensor`), which is what colocated engines and learners use: the CPU run here
    exercises the shared-memory-file path of the same code."""
    import torch.multiprocessing as mp

    from learner.group_store import new_secret
    from learner.weights import TensorSpec, checksum, make_transport, pack, plan_buckets
    from learner.worker import free_port

    wire = torch.bfloat16
    per_bucket = 4 * 2 ** 20 if CUDA else 64 * 2 ** 10  # bytes
    shapes = []
    for i in range(600):  # ~3 tensors a bucket, odd sizes
        rows = 1 + (i * 37) % 61
        cols = max(1, (per_bucket // 2 // 3) // rows - (i % 7))
        shapes.append((rows, cols))
    specs = [TensorSpec(f"w{i}", s) for i, s in enumerate(shapes)]
    buckets = plan_buckets(specs, per_bucket, 2)
    plan = [[(s.name, list(s.shape)) for s in b] for b in buckets]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    host, port, secret = "127.0.0.1", free_port(), new_secret()
    child = ctx.Process(target=_shared_receiver, args=(host, port, secret, plan, "bfloat16", 0, results), daemon=True)
    child.start()
    try:
        transport = make_transport("shared", host, port, 0, 2, 0, TRANSPORT_TIMEOUT_S, secret=secret)
        space = torch.empty(max(sum(s.numel for s in b) for b in buckets), dtype=wire, device=DEVICE)
        start, sums, index, nbytes = time.perf_counter(), [], 0, 0
        for bucket in buckets:
            tensors = [_transport_tensor(index + j, s.shape, DEVICE) for j, s in enumerate(bucket)]
            index += len(bucket)
            numel = sum(s.numel for s in bucket)
            buf = pack(tensors, numel, wire, DEVICE, out=space)
            transport.send(buf)  # returns once the receiver copied it out: `space` is free again
            sums.append(list(checksum(buf)))
            nbytes += buf.numel() * buf.element_size()
        elapsed = time.perf_counter() - start
        transport.close()
        got, deadline = None, time.monotonic() + 60
        while got is None and time.monotonic() < deadline:  # a receiver that died says nothing: stop waiting
            try:
                got = results.get(timeout=1)
            except queue.Empty:
                if not child.is_alive():
                    deadline = min(deadline, time.monotonic() + 2)
        if got is None:
            raise RuntimeError(f"the receiver process returned nothing (exit code {child.exitcode})")
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    if "error" in got:
        raise RuntimeError(f"receiver: {got['error']}\n{got['traceback']}")
    return dict(ok=got["sums"] == sums and got["wrong"] == 0, backend="cuda-ipc" if CUDA else "shm-file",
                buckets=len(buckets), tensors=len(specs), mib=round(nbytes / 2 ** 20, 1),
                checksums_equal=got["sums"] == sums, tensors_wrong=got["wrong"],
                send_seconds=round(elapsed, 3), mib_per_s=round(nbytes / 2 ** 20 / elapsed, 1))


# --------------------------------------------------------------------------- 3. NCCL transport


def check_broadcast_transport():
    """A BroadcastTransport of world size 1 (make_transport "nccl" on GPU, "gloo" on CPU): built
    (signed store, admission, process group), used (one bucket sent: the communicator is created
    on this first collective), closed (NCCL's communicator aborted), then a second generation built
    and used on a fresh port; after close the old transport refuses to send.

    Only a GPU shows the NCCL path: ProcessGroupNCCL over our SignedStore (NCCL's unique id passes
    through the signed view), its timeout options and `abort()`; CI only ever runs gloo."""
    from learner.group_store import new_secret
    from learner.weights import checksum, make_transport
    from learner.worker import free_port

    backend = "nccl" if CUDA else "gloo"
    figures, ok = [], True
    for generation in (0, 1):
        t0 = time.perf_counter()
        transport = make_transport(backend, "127.0.0.1", free_port(), 0, 1, generation, TRANSPORT_TIMEOUT_S,
                                   secret=new_secret())
        built = time.perf_counter() - t0
        buf = torch.arange(1001, dtype=torch.float32, device=DEVICE).to(torch.bfloat16)
        before = checksum(buf)
        t1 = time.perf_counter()
        transport.send(buf)
        _sync()
        sent = time.perf_counter() - t1
        same = checksum(buf) == before
        transport.close()
        try:
            transport.send(buf)
            refused = False
        except Exception:  # noqa: BLE001 - any error: a closed transport must not send
            refused = True
        ok = ok and same and refused
        figures.append(dict(generation=generation, build_s=round(built, 3), first_send_s=round(sent, 3),
                            buffer_unchanged=same, refuses_after_close=refused))
    return dict(ok=ok, backend=backend, runs=figures)


# --------------------------------------------------------------------------- 4. chunked logprobs


def check_chunked_logprobs():
    """chunked_logprobs on a 16k x 152k bf16 logits tensor (CPU: 512 x 4096): peak memory of
    forward and forward+backward without chunking and with chunks of 2048 positions; logprobs and
    logits gradients of the two equal, and the logprobs equal a plain fp32 log_softmax gather.

    Only a GPU shows it: the saving is the point of chunking (~20 GB at this size, where a
    micro-batch's logits live on an 80-141 GB device), and torch.cuda.max_memory_allocated measures
    it; the CPU run checks the values alone."""
    from learner.logprobs import chunked_logprobs

    n, vocab, chunk, temperature = (16384, 151936, 2048, 0.7) if CUDA else (512, 4096, 96, 0.7)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(n, vocab, generator=g, device=DEVICE, dtype=torch.bfloat16) * 3).view(1, n, vocab)
    targets = torch.randint(0, vocab, (1, n), generator=g, device=DEVICE)
    weights = torch.randn(1, n, generator=g, device=DEVICE)
    out, figures = {}, {}
    for c in (0, chunk):
        leaf = logits.detach().requires_grad_(True)
        _free()
        base = torch.cuda.memory_allocated() if CUDA else 0
        t0 = time.perf_counter()
        logp, _ = chunked_logprobs(leaf, targets, temperature, c)
        _sync()
        fwd_peak = (torch.cuda.max_memory_allocated() - base) / GiB if CUDA else None
        (logp * weights).sum().backward()
        _sync()
        peak = (torch.cuda.max_memory_allocated() - base) / GiB if CUDA else None
        out[c] = (logp.detach(), leaf.grad)
        figures[f"chunk_{c}"] = dict(fwd_peak_gib=fwd_peak and round(fwd_peak, 2),
                                     fwd_bwd_peak_gib=peak and round(peak, 2),
                                     seconds=round(time.perf_counter() - t0, 3))
        del leaf, logp
    (lp0, g0), (lpc, gc_) = out[0], out[chunk]
    diff_chunking = (lp0 - lpc).abs().max().item()
    grad_diff = (g0.float() - gc_.float()).abs().max().item()
    del out, g0, gc_
    _free()
    rows = n
    try:
        ref = torch.log_softmax(logits[0].float() / temperature, -1).gather(-1, targets[0].unsqueeze(-1)).squeeze(-1)
    except torch.cuda.OutOfMemoryError:  # the whole fp32 copy does not fit: a slice of positions
        _free()
        rows = 2048
        ref = torch.log_softmax(logits[0, :rows].float() / temperature, -1).gather(
            -1, targets[0, :rows].unsqueeze(-1)).squeeze(-1)
    diff_ref = max((lpc[0, :rows] - ref).abs().max().item(), (lp0[0, :rows] - ref).abs().max().item())
    ok = diff_chunking <= 1e-5 and diff_ref <= 1e-4 and grad_diff <= 1e-3
    if CUDA:
        ok = ok and figures[f"chunk_{chunk}"]["fwd_bwd_peak_gib"] < figures["chunk_0"]["fwd_bwd_peak_gib"]
    return dict(ok=ok, device=DEVICE.type, shape=[n, vocab], dtype="bfloat16", chunk=chunk,
                max_abs_diff_chunked_vs_whole=diff_chunking, max_abs_diff_vs_fp32_log_softmax=diff_ref,
                reference_rows=rows, max_abs_grad_diff=grad_diff, **figures)


# --------------------------------------------------------------------------- 5. shared prompts


def check_shared_prompts(ctx):
    """Shared-prompt packing (one row per prompt group under a block mask) against one padded row
    per sequence, on the tiny Qwen2 under sdpa in a LearnerWorker: bf16 compute (FSDP2 mixed
    precision) on CUDA, fp32 on CPU. Token logprobs, and every parameter's gradient of one GRPO
    step (clipped surrogate + KL to the reference + entropy bonus), close; max abs diffs reported.

    Only a GPU shows the bf16 case: the additive 4D block mask is built in the compute dtype and
    sdpa picks other kernels on CUDA (with a float mask: the memory-efficient one) than on CPU;
    the CPU run is tests/test_shared_prompts.py's fp32 equality (tolerance 1e-5)."""
    if not ctx["transformers"]:
        return dict(skipped="no transformers")
    from learner.objectives import GRPOObjective
    from learner.worker import _full

    w = _worker(ctx["tiny"], objective=GRPOObjective(kl_coef=0.1, entropy_coef=0.01), share_prompts=True)
    try:
        if not w.share_prompts:
            raise RuntimeError(f"the worker refused shared prompts under {w.model.config._attn_implementation}")
        batch = _make_batch()
        w.share_prompts = False
        plain = w.logprobs(batch)
        w.share_prompts = True
        shared = w.logprobs(batch)
        lp_diff = max(abs(a - b) for p, s in zip(plain, shared) for a, b in zip(p, s))

        def grads(share: bool):
            w.share_prompts = share
            captured = {}

            def capture() -> float:
                captured.update({n: _full(p.grad).detach().float().cpu().clone()
                                 for n, p in w.model.named_parameters()})
                w.optimizer.zero_grad(set_to_none=True)
                return 0.0

            w._clip_and_step = capture  # the gradient of one step, no update
            try:
                metrics = w.train_step(_make_batch(1))
            finally:
                del w._clip_and_step
            return metrics, captured

        m_plain, g_plain = grads(False)
        m_shared, g_shared = grads(True)
        abs_diff = max((g_shared[k] - g).abs().max().item() for k, g in g_plain.items())
        scale = max(g.abs().max().item() for g in g_plain.values())
        rel_norm = max(((g_shared[k] - g).norm() / g.norm().clamp_min(1e-30)).item() for k, g in g_plain.items())
        loss_diff = abs(m_shared["loss"] - m_plain["loss"])
        bf16 = w.compute_dtype == torch.bfloat16
        ok = (lp_diff < 0.1 and rel_norm < 0.05) if bf16 else (lp_diff < 1e-5 and abs_diff < 1e-5)
        return dict(ok=ok and scale > 1e-3, compute_dtype=str(w.compute_dtype).removeprefix("torch."),
                    attention=w.model.config._attn_implementation, max_abs_logprob_diff=lp_diff,
                    max_abs_grad_diff=abs_diff, max_abs_grad=scale, worst_rel_grad_norm_diff=rel_norm,
                    loss_diff=loss_diff, padding_frac_plain=m_plain["padding_frac"],
                    padding_frac_shared=m_shared["padding_frac"])
    finally:
        w.shutdown()


# --------------------------------------------------------------------------- 6. worker: offload, checkpoint


def check_worker_offload(ctx):
    """A LearnerWorker (world size 1, mixed precision on CUDA) of the tiny Qwen2: a train step,
    `offload` (torch.cuda.memory_allocated after it), a checkpoint taken while offloaded, `reload`,
    a second step; before the full offload, `offload("optimizer")` (the colocated hand-over's first
    move) and the memory after it. A second worker with the same seed runs the two steps without offload: its
    parameters must equal the first's bit for bit. A third loads the checkpoint (equal to the
    first worker's parameters after step 1) and runs the second step: equal bit for bit again.
    Deterministic algorithms are on (warn only) for these steps; if the plain runs differ from
    each other too, the GPU is not reproducible here and that is reported instead.

    Only a GPU shows it: on the CPU `offload`/`reload` are no-ops (the CPU run checks the steps and
    the checkpoint alone); on GPU they move FSDP2's sharded parameters and AdamW's state with
    non-blocking copies, which a checkpoint taken right after must not read half-copied."""
    if not ctx["transformers"]:
        return dict(skipped="no transformers")
    first, second = _make_batch(0), _make_batch(2)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    ckpt = Path(tempfile.mkdtemp(prefix="gpu-check-ckpt-"))
    try:
        w = _worker(ctx["tiny"])
        try:
            m1 = w.train_step(first)
            after_one = _params(w)
            _sync()
            before = torch.cuda.memory_allocated() if CUDA else None
            w.offload("optimizer")  # the colocated hand-over's first move: AdamW's moments out, weights kept
            _sync()
            handover = torch.cuda.memory_allocated() if CUDA else None
            where = w.offload()
            _sync()
            offloaded = torch.cuda.memory_allocated() if CUDA else None
            w.save_checkpoint(str(ckpt))  # right after offload, as the trainer does between steps
            back = w.reload()
            m2 = w.train_step(second)
            with_offload = _params(w)
        finally:
            w.shutdown()

        def plain_run(load: bool):
            v = _worker(ctx["tiny"])
            try:
                if load:
                    v.load_checkpoint(str(ckpt))
                    loaded = _params(v)
                else:
                    v.train_step(first)
                    loaded = None
                v.train_step(second)
                return loaded, _params(v)
            finally:
                v.shutdown()

        _, without = plain_run(False)
        loaded, resumed = plain_run(True)
        equal = all(_same_bits(with_offload[k], without[k]) for k in without)
        ckpt_equal = all(_same_bits(loaded[k], after_one[k]) for k in after_one)
        resumed_equal = all(_same_bits(resumed[k], with_offload[k]) for k in with_offload)
        figures = dict(device=DEVICE.type, offload_to=where, reload_to=back,
                       mib_allocated_before_offload=before and round(before / 2 ** 20, 2),
                       mib_allocated_optimizer_offloaded=handover and round(handover / 2 ** 20, 2),
                       mib_allocated_after_offload=offloaded and round(offloaded / 2 ** 20, 2),
                       step1_loss=m1["loss"], step2_loss=m2["loss"], second_step_equal_without_offload=equal,
                       checkpoint_equals_step1=ckpt_equal, resumed_step_equal=resumed_equal)
        if not equal:
            _, again = plain_run(False)
            figures["plain_runs_reproducible"] = all(_same_bits(again[k], without[k]) for k in without)
            figures["max_abs_param_diff"] = max((with_offload[k].float() - without[k].float()).abs().max().item()
                                                for k in without)
        return dict(ok=equal and ckpt_equal and resumed_equal, **figures)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        shutil.rmtree(ckpt, ignore_errors=True)


# --------------------------------------------------------------------------- 7. throughput and MFU


def check_learner_mfu(ctx):
    """Learner throughput on a Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 KV heads,
    intermediate 4864, vocab 151936, tied embeddings; random weights built from its config on the
    GPU) as the learner runs it: FSDP2 per layer with bf16 compute / fp32 reductions on a 1-rank
    NCCL group, sdpa, chunked logprobs (4096 positions), AdamW. Tokens/s of forward+backward+step
    over 5 timed steps of 8 x 2048 tokens after 2 warm-up steps; MFU = 6 * params * tokens/s /
    989e12 (the H200's dense bf16 peak), and the same against 790e12 (a bf16 matmul measured there).

    Only a GPU can show it: it is a speed, and the CPU would take hours."""
    if not CUDA:
        return dict(skipped="no CUDA (a 0.5B model's training steps are far too slow on CPU)")
    if not ctx["transformers"]:
        return dict(skipped="no transformers")
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM, Qwen2Config

    from learner.logprobs import chunked_logprobs
    from learner.worker import free_port

    torch.cuda.set_device(DEVICE)
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                             tie_word_embeddings=True, rms_norm_eps=1e-6)
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
        params = sum(p.numel() for p in model.parameters())
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        batch, length, warm, timed = 8, 2048, 2, 5
        g = torch.Generator(device=DEVICE).manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (batch, length), generator=g, device=DEVICE)
        mask = torch.ones_like(ids)

        def step() -> float:
            out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1])
            logp, _ = chunked_logprobs(out.logits, ids[:, 1:], 1.0, 4096)
            loss = -logp.mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        _free()
        for _ in range(warm):
            step()
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(timed):
            loss = step()
        end.record()
        torch.cuda.synchronize()
        seconds = begin.elapsed_time(end) / 1000
        tokens = batch * (length - 1) * timed
        tps = tokens / seconds
        return dict(ok=bool(torch.isfinite(loss)), params=params, tokens_per_step=batch * (length - 1),
                    step_seconds=round(seconds / timed, 4), tokens_per_s=round(tps), mfu=round(6 * params * tps /
                    H200_BF16_PEAK, 4), mfu_vs_measured_matmul=round(6 * params * tps / H200_BF16_MEASURED, 4),
                    peak_gib=round(torch.cuda.max_memory_allocated() / GiB, 2), gpu=torch.cuda.get_device_name())
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- driver


CHECKS = [
    ("checksum_pack", check_checksum_pack, False),
    ("shared_transport", check_shared_transport, False),
    ("broadcast_transport", check_broadcast_transport, False),
    ("chunked_logprobs", check_chunked_logprobs, False),
    ("shared_prompts", check_shared_prompts, True),
    ("worker_offload", check_worker_offload, True),
    ("learner_mfu", check_learner_mfu, True),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated check names (default: all)")
    args = parser.parse_args()
    only = {s for s in args.only.split(",") if s}
    have = _have_transformers()  # before the stub: transformers looks nothing up under its name
    _install_ray_stub()
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    os.environ.setdefault("RAYGRPO_CACHE", str(scratch / "cache"))
    ctx = {"transformers": have, "tiny": None}
    env = dict(check="environment", torch=torch.__version__, cuda=CUDA,
               device=torch.cuda.get_device_name() if CUDA else "cpu", transformers=None, python=sys.version.split()[0])
    if have:
        import transformers

        env["transformers"] = transformers.__version__
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    print(json.dumps(env), flush=True)
    failed = False
    try:
        for name, fn, wants_ctx in CHECKS:
            if only and name not in only:
                continue
            start = time.perf_counter()
            faulthandler.dump_traceback_later(CHECK_LIMIT_S, exit=False)
            try:
                if wants_ctx and have and ctx["tiny"] is None:
                    ctx["tiny"] = _tiny_model_dir(scratch)
                result = fn(ctx) if wants_ctx else fn()
            except Exception as err:  # noqa: BLE001 - reported, and the next check runs
                result = dict(ok=False, error=f"{type(err).__name__}: {err}"[:2000],
                              traceback=traceback.format_exc()[-3000:])
            finally:
                faulthandler.cancel_dump_traceback_later()
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():  # a check that failed half-way
                    dist.destroy_process_group()
                _free()
            line = {"check": name, **result}
            if "skipped" not in result:
                line["seconds"] = round(time.perf_counter() - start, 2)
                failed = failed or not result.get("ok", False)
            print(json.dumps(line, default=str), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    real = [m for m in ("vllm",) if sys.modules.get(m) is not None] + \
        ([] if getattr(sys.modules.get("ray"), "IS_GPU_CHECK_STUB", False) else ["ray"])
    if real:
        print(json.dumps({"check": "imports", "ok": False, "error": f"imported {real}"}), flush=True)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
