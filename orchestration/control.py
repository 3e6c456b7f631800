"""Operating a run from outside: stop it cleanly, resize its rollout pool, export a checkpoint.

- Signals: the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) lets the step in
  flight finish, writes a checkpoint and stops (`RunStopped`); a second SIGINT stops at once (the
  newest complete checkpoint stays usable: checkpoints are written atomically).
- Scaling: the driver serves a named Ray actor (`ControlActor`, namespace `raygrpo`) and reads its
  requests between steps; `raygrpo scale rollout=N [run=<output_dir>] [address=<ray address>]`
  or `scale(N, ...)` from Python asks for N rollout actors. New engines start in the background
  and receive the current weights before they serve; removed ones finish their work first.
  The run directory's `control.json` says which cluster and actor serve the run.
- `raygrpo export checkpoint=<dir> [out=<dir>]` writes a checkpoint's policy as a Hugging Face
  directory (loadable by transformers and vLLM as is), without Ray.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("raygrpo")
NAMESPACE = "raygrpo"


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
    """The named actor a running driver serves: requests wait here until the driver's next step."""

    def __init__(self):
        self.rollout: int | None = None
        self.status: dict[str, Any] = {}

    def scale(self, rollout: int) -> dict[str, Any]:
        self.rollout = rollout
        return self.status

    def take(self) -> int | None:
        requested, self.rollout = self.rollout, None
        return requested

    def report(self, status: dict[str, Any]) -> None:
        self.status = status


class Control:
    """The driver's side: serve the named actor, apply its requests between steps."""

    def __init__(self, run_dir: Path):
        import ray

        self.name = f"control:{run_dir.resolve()}"
        self.actor = ray.remote(ControlActor).options(name=self.name, namespace=NAMESPACE, num_cpus=0,
                                                      lifetime="non_detached").remote()
        record = {"address": ray.get_runtime_context().gcs_address, "actor": self.name, "namespace": NAMESPACE,
                  "auth_mode": os.environ.get("RAY_AUTH_MODE", "")}  # never the token itself
        (run_dir / "control.json").write_text(json.dumps(record, indent=1))

    def close(self) -> None:
        """Stop serving (the next stage of a pipeline shares this Ray session)."""
        import ray

        ray.kill(self.actor)

    def apply(self, pool: Any, step: int) -> None:
        """Resize the rollout pool if someone asked; report the step and pool size."""
        import ray

        requested = ray.get(self.actor.take.remote())
        if requested is not None and requested != pool.target:
            log.warning("step %d: rollout actors %d -> %d (requested from outside)", step, pool.target, requested)
            try:
                pool.resize(requested)
            except ValueError as err:  # e.g. colocated engines are paired with learner ranks
                log.error("scale request ignored: %s", err)
        self.actor.report.remote({"step": step, "rollout_actors": len(pool.actors), "rollout_target": pool.target})


def scale(rollout: int, run: str | None = None, address: str | None = None) -> dict[str, Any]:
    """Ask a running job for `rollout` rollout actors (applied between its steps); returns its
    last reported status. `run`: its output_dir (needed when several runs share a cluster)."""
    if rollout < 1:
        raise ValueError(f"rollout must be >= 1, got {rollout}")
    record = json.loads((Path(run) / "control.json").read_text()) if run else {}
    if record.get("auth_mode") and "RAY_AUTH_MODE" not in os.environ:  # a local ray.init() turns token auth on
        os.environ["RAY_AUTH_MODE"] = record["auth_mode"]  # read at import; the token: RAY_AUTH_TOKEN or Ray's file
    import ray

    ray.init(address=address or record.get("address") or "auto", namespace=NAMESPACE, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == NAMESPACE and a["name"].startswith("control:")]
        name = record.get("actor") or (names[0] if len(names) == 1 else None)
        if name is None:
            raise ValueError(f"{len(names)} raygrpo runs on this cluster: name one with run=<output_dir>"
                             if names else "no running raygrpo job on this cluster")
        return ray.get(ray.get_actor(name, namespace=NAMESPACE).scale.remote(rollout))
    finally:
        ray.shutdown()


def export(checkpoint: str, out: str | None = None) -> Path:
    """Write the policy of a checkpoint as a Hugging Face directory (default `<checkpoint>/policy`)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(checkpoint)
    hf = src / "learner" / "hf"
    if not (hf / "config.json").is_file():
        raise ValueError(f"{checkpoint} is not a raygrpo checkpoint (no learner/hf/config.json)")
    target = Path(out) if out else src / "policy"
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf), dtype=torch.float32)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(src / "learner"), no_dist=True)
    model.load_state_dict(state["model"])
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(hf).save_pretrained(target)
    return target


def command(name: str, args: list[str]) -> int:
    """`raygrpo scale ...` / `raygrpo export ...`: key=value arguments; returns the exit status."""
    usage = {"scale": "raygrpo scale rollout=N [run=<output_dir>] [address=<ray address>]",
             "export": "raygrpo export checkpoint=<dir> [out=<dir>]"}[name]
    try:
        kv = dict(a.split("=", 1) for a in args)
        allowed = {"scale": {"rollout", "run", "address"}, "export": {"checkpoint", "out"}}[name]
        if set(kv) - allowed:
            raise ValueError(f"unknown argument(s) {', '.join(sorted(set(kv) - allowed))}")
        if name == "scale":
            status = scale(int(kv["rollout"]), kv.get("run"), kv.get("address"))
            print(f"asked for {kv['rollout']} rollout actors, applied before the run's next step "
                  f"(last reported: {status or 'nothing yet'})")
        else:
            print(f"policy written to {export(kv['checkpoint'], kv.get('out'))}")
    except KeyError as err:
        print(f"raygrpo: error: missing argument {err}\nusage: {usage}", file=sys.stderr)
        return 2
    except (ValueError, ConnectionError, FileNotFoundError) as err:
        print(f"raygrpo: error: {err}\nusage: {usage}", file=sys.stderr)
        return 2
    return 0
