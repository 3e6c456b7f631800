"""Operating a run from outside: stop it cleanly, resize its rollout pool, export a checkpoint.

- Signals: the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) lets the step in
  flight finish, writes a checkpoint and stops (`RunStopped`); a second SIGINT stops at once (the
  newest complete checkpoint stays usable: checkpoints are written atomically).
- Scaling: the driver serves a named Ray actor (`ControlActor`, namespace `raygrpo`) and reads its
  requests between steps; `raygrpo scale rollout=N run=<output_dir> [address=<ray address>]`
  or `scale(N, run=...)` from Python asks for N rollout actors. New engines start in the background
  and receive the current weights before they serve; removed ones finish their work first.
  The run directory's `control.json` says which cluster and actor serve the run (never a secret);
  `control.token` (mode 0600, made afresh at each start) holds the run's token: the actor knows
  only its SHA-256 and refuses a request without it, so only who can read the run directory's
  token can scale the run. A refused or malformed request is answered with the reason, logged by
  the driver ("refused scale request: ...") and never reaches the pool.
- `raygrpo export checkpoint=<dir> [out=<dir>]` writes a checkpoint's policy as a Hugging Face
  directory (loadable by transformers and vLLM as is), without Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from common.files import write_secret

log = logging.getLogger("raygrpo")
NAMESPACE = "raygrpo"
TOKEN_FILE = "control.token"
MAX_ROLLOUT = 1024  # a sane bound: no request may ask the cluster for a million engines
MAX_REFUSALS = 20  # refusals kept for the driver's log between two steps (a flood is counted, not kept)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()  # any str a caller sends


def check_rollout(rollout: Any) -> int:
    """`rollout` as a number of rollout actors, or ValueError saying why not (an int, not a bool,
    1..MAX_ROLLOUT); the message never repeats a string it was given."""
    if isinstance(rollout, bool) or not isinstance(rollout, int):
        raise ValueError(f"rollout must be an integer, got {type(rollout).__name__}")
    if not 1 <= rollout <= MAX_ROLLOUT:
        shown = rollout if abs(rollout) < 10**12 else "a larger number"
        raise ValueError(f"rollout must be between 1 and {MAX_ROLLOUT}, got {shown}")
    return rollout


class RunStopped(RuntimeError):
    """The run stopped before its last step (a signal, or a fault it cannot heal); `exit_code` is
    the process's exit status, the message says where to resume from."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopFlag:
    """Signal handlers for a run's lifetime: the first SIGINT/SIGTERM sets `signum`; a second
    SIGINT raises KeyboardInterrupt (stop now). Restores the old handlers on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            print(f"\nraygrpo: {signal.Signals(signum).name}: finishing the step in flight, then writing a "
                  f"checkpoint and stopping (Ctrl-C again stops at once)", file=sys.stderr, flush=True)


class ControlActor:
    """The named actor a running driver serves: requests wait here until the driver's next step.

    Any client of the cluster can call a named actor, so every method asks for the run's token and
    the actor holds only its SHA-256 (`token_digest`). A bad request is refused here, answered with
    the reason and kept for the driver to log; it never replaces a pending valid one."""

    def __init__(self, token_sha256: str):
        self.token_sha256 = token_sha256
        self.rollout: int | None = None
        self.status: dict[str, Any] = {}
        self.refusals: list[str] = []
        self.dropped = 0  # refusals beyond MAX_REFUSALS since the driver last looked

    def scale(self, rollout: Any, token: Any = None) -> dict[str, Any]:
        """Ask for `rollout` rollout actors: {"accepted": True, "status": last reported} or
        {"accepted": False, "error": why}."""
        try:
            self._authorize(token)
            self.rollout = check_rollout(rollout)
        except (PermissionError, ValueError) as err:
            self._refuse(str(err))
            return {"accepted": False, "error": str(err)}
        return {"accepted": True, "status": self.status}

    def take(self, token: Any) -> tuple[int | None, list[str]]:
        """The driver's: the pending request (None if none) and the refusals since the last take."""
        self._authorize(token)
        requested, self.rollout = self.rollout, None
        refusals, self.refusals = self.refusals, []
        if self.dropped:
            refusals.append(f"{self.dropped} more refused requests not kept")
            self.dropped = 0
        return requested, refusals

    def report(self, status: dict[str, Any], token: Any) -> None:
        """The driver's: the status the next scale request is answered with."""
        self._authorize(token)
        self.status = status

    def _authorize(self, token: Any) -> None:
        # compare_digest: the time taken says nothing about how much of a guess was right
        if not (isinstance(token, str) and len(token) <= 256
                and hmac.compare_digest(token_digest(token), self.token_sha256)):
            raise PermissionError("missing or wrong run token (it is in the run directory's control.token)")

    def _refuse(self, reason: str) -> None:
        if len(self.refusals) < MAX_REFUSALS:
            self.refusals.append(reason)
        else:
            self.dropped += 1


class Control:
    """The driver's side: serve the named actor, apply its requests between steps."""

    def __init__(self, run_dir: Path):
        import ray

        self.name = f"control:{run_dir.resolve()}"
        self._token = new_run_token(run_dir)
        self.actor = ray.remote(ControlActor).options(name=self.name, namespace=NAMESPACE, num_cpus=0,
                                                      lifetime="non_detached").remote(token_digest(self._token))
        record = {"address": ray.get_runtime_context().gcs_address, "actor": self.name, "namespace": NAMESPACE,
                  "auth_mode": os.environ.get("RAY_AUTH_MODE", ""),  # never a token itself, only where one is
                  "auth_token_path": os.environ.get("RAY_AUTH_TOKEN_PATH", "")}
        (run_dir / "control.json").write_text(json.dumps(record, indent=1))

    def close(self) -> None:
        """Stop serving (the next stage of a pipeline shares this Ray session)."""
        import ray

        ray.kill(self.actor)

    def apply(self, pool: Any, step: int) -> None:
        """Resize the rollout pool if someone asked; log refused requests; report the step and pool size."""
        import ray

        requested, refusals = ray.get(self.actor.take.remote(self._token))
        for reason in refusals:
            log.warning("refused scale request: %s", reason)
        if requested is not None and requested != pool.target:
            log.warning("step %d: rollout actors %d -> %d (requested from outside)", step, pool.target, requested)
            try:
                pool.resize(requested)
            except Exception as err:  # colocated engines are paired with learner ranks, or worse: the run goes on
                log.error("scale request ignored: %s: %s", type(err).__name__, err)
        self.actor.report.remote({"step": step, "rollout_actors": len(pool.actors), "rollout_target": pool.target},
                                 self._token)


def new_run_token(run_dir: Path) -> str:
    """A fresh run token in `<run_dir>/control.token` (0600; the previous start's is replaced)."""
    token = secrets.token_urlsafe(32)
    path = run_dir / TOKEN_FILE
    path.unlink(missing_ok=True)  # a link or file left there is removed, never written through
    write_secret(path, token)
    return token


def read_run_token(run: str | Path) -> str:
    """The token of the run in directory `run`, or ValueError saying why it cannot be read."""
    path = Path(run) / TOKEN_FILE
    try:
        return path.read_text().strip()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err} "
                         f"(only the user who started the run can scale it)") from None


def scale(rollout: int, run: str | None = None, address: str | None = None,
          token: str | None = None) -> dict[str, Any]:
    """Ask a running job for `rollout` rollout actors (applied between its steps); returns its
    last reported status, or raises ValueError with the job's reason for refusing. `run`: its
    output_dir, where the run's token is read from (`token`: that token, given instead)."""
    check_rollout(rollout)
    if token is None:
        if not run:
            raise ValueError("run=<output_dir> is needed: the run's token is read from its control.token")
        token = read_run_token(run)
    record = json.loads((Path(run) / "control.json").read_text()) if run else {}
    if record.get("auth_mode") and "RAY_AUTH_MODE" not in os.environ:  # a local ray.init() turns token auth on
        os.environ["RAY_AUTH_MODE"] = record["auth_mode"]  # read at import
    if record.get("auth_token_path") and not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ):
        os.environ["RAY_AUTH_TOKEN_PATH"] = record["auth_token_path"]  # the cluster's token (a local raygrpo Ray's)
    import ray

    from orchestration.cluster.placement import is_loopback_address, loopback_kept

    address = address or record.get("address") or "auto"
    with loopback_kept() if is_loopback_address(address) else contextlib.nullcontext():  # a local raygrpo Ray
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    try:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE and a["name"].startswith("control:")]
        name = record.get("actor") or (names[0] if len(names) == 1 else None)
        if name is None:
            raise ValueError(f"{len(names)} raygrpo runs on this cluster: name one with run=<output_dir>"
                             if names else "no running raygrpo job on this cluster")
        answer = ray.get(ray.get_actor(name, namespace=NAMESPACE).scale.remote(rollout, token))
    finally:
        ray.shutdown()
    if not answer["accepted"]:
        raise ValueError(f"the run refused the request: {answer['error']}")
    return answer["status"]


def export(checkpoint: str, out: str | None = None, merge: bool = False) -> Path:
    """Write the policy of a checkpoint as a Hugging Face directory (default `<checkpoint>/policy`); a
    LoRA checkpoint as its peft adapter (with `merge`, the merged model, adapter in `adapter/`)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from learner.checkpoint_io import SafeLoadPlanner, SafeReader  # a checkpoint is data: nothing unpickled freely

    src = Path(checkpoint)
    hf = src / "learner" / "hf"
    if not (hf / "config.json").is_file():
        raise ValueError(f"{checkpoint} is not a raygrpo checkpoint (no learner/hf/config.json)")
    target = Path(out) if out else src / "policy"
    if (hf / "adapter_config.json").is_file():
        return export_adapter(src, target, merge)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf), dtype=torch.float32)
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=SafeReader(str(src / "learner")), planner=SafeLoadPlanner(), no_dist=True)
    model.load_state_dict(state["model"])
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(hf).save_pretrained(target)
    return target


def export_adapter(src: Path, target: Path, merge: bool) -> Path:
    """A LoRA checkpoint holds the adapters alone: peft's adapter on the base model its
    adapter_config.json names (`base_model_name_or_path`, which must be readable here)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from peft import PeftConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from learner.checkpoint_io import SafeLoadPlanner, SafeReader
    from learner.export import write_policy
    from learner.lora import is_adapter

    config = PeftConfig.from_pretrained(src / "learner" / "hf")
    if not Path(config.base_model_name_or_path).exists():
        raise FileNotFoundError(f"the adapter's base model {config.base_model_name_or_path} is not on this machine")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype=torch.float32),
                           config)
    state = {"model": {k: v for k, v in model.state_dict().items() if is_adapter(k)}}
    dcp.load(state, storage_reader=SafeReader(str(src / "learner")), planner=SafeLoadPlanner(), no_dist=True)
    model.load_state_dict(state["model"], strict=False)  # the adapters (DCP raised on any the checkpoint lacks)
    write_policy(model, model.state_dict(), str(target), str(src / "learner" / "hf"), lora=True, merge=merge)
    return target


def command(name: str, args: list[str]) -> int:
    """`raygrpo scale ...` / `raygrpo export ...`: key=value arguments; returns the exit status."""
    usage = {"scale": "raygrpo scale rollout=N run=<output_dir> [address=<ray address>]",
             "export": "raygrpo export checkpoint=<dir> [out=<dir>] [merge=true]"}[name]
    try:
        kv = dict(a.split("=", 1) for a in args)
        allowed = {"scale": {"rollout", "run", "address"}, "export": {"checkpoint", "out", "merge"}}[name]
        if set(kv) - allowed:
            raise ValueError(f"unknown argument(s) {', '.join(sorted(set(kv) - allowed))}")
        if name == "scale":
            status = scale(int(kv["rollout"]), kv["run"], kv.get("address"))
            print(f"asked for {kv['rollout']} rollout actors, applied before the run's next step "
                  f"(last reported: {status or 'nothing yet'})")
        else:
            merge = kv.get("merge", "false").lower() in ("1", "true", "yes")
            print(f"policy written to {export(kv['checkpoint'], kv.get('out'), merge)}")
    except KeyError as err:
        print(f"raygrpo: error: missing argument {err}\nusage: {usage}", file=sys.stderr)
        return 2
    except (ValueError, ConnectionError, FileNotFoundError) as err:
        print(f"raygrpo: error: {err}\nusage: {usage}", file=sys.stderr)
        return 2
    return 0
