"""Checkpoints of a run, written atomically, and the choice of one to resume from.

Layout: `<output_dir>/checkpoints/step_00000012/` holds everything needed to continue after step
11 as if the run had never stopped:
- `learner/`: the learner's sharded model, optimizer and (per rank, `rank{r}.pt`) LR schedule and
  RNG state — `torch.distributed.checkpoint`, written by every rank (the directory must be on
  storage every learner node sees); read back without running anything it holds
  (`learner.checkpoint_io`);
- `run.json`: the driver's state (`RunState`: next step, policy version, evaluations so far,
  metrics waiting to be logged, completions generated but not yet trained on, RNGs) as JSON, in
  an explicit codec that builds only the dataclasses of `STATE_TYPES` (`to_json` / `from_json`);
- `metrics.jsonl`: the run's metrics so far (restored on resume, so nothing is logged twice);
- `state.json`: the config and a summary, for people and for the compatibility check;
- `COMPLETE`: written last. A checkpoint is written into `.partial-step_N/` and renamed into place
  only after `COMPLETE` is on disk; a crash or a full disk mid-write leaves the previous
  checkpoint as the newest complete one. Only the newest `checkpoint.keep` are kept.

A checkpoint may come from someone else: nothing in it is unpickled or imported. A checkpoint of
an older raygrpo, whose driver state is a pickle (`run.pkl`), is refused.

Resuming is exact for `rollout.max_staleness=0` on the same machine and world size in fp32:
sampling seeds are functions of (run seed, step, round, prompt, sample), data batches of (seed,
step), and the weights and optimizer state are restored bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from common.files import write_dir_atomic, write_synced
from orchestration.config import ConfigError

log = logging.getLogger("raygrpo")

COMPLETE = "COMPLETE"
STATE_FILE = "run.json"
STATE_FORMAT = 1  # of run.json; a reader refuses others
OLD_STATE_FILE = "run.pkl"  # raygrpo before the JSON state: never loaded
# May not change on resume: the policy and what it was trained on would no longer be one run.
FIXED = ("model.path", "seed", "task", "data.train_files", "data.prompt_key", "data.answer_key", "data.shuffle",
         "rollout.prompts_per_step")
# May change and keep the resume exact: run length, where things are written, logging, placement of
# the engines, deadlines. Anything else may change too, but the resumed run is then a different run.
EXACT_ANYWAY = ("steps", "resume", "output_dir", "logger", "checkpoint", "eval", "rollout.num_actors", "ray",
                "rollout.timeout_s", "sync.timeout_s", "reward.timeout_s", "reward.num_workers", "topology",
                "dry_run", "experiment")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


@dataclass
class RunState:
    """The driver's side of a run, as checkpointed."""

    step: int = 0  # the next step to run
    version: int = 0  # the policy version the engines hold
    evals: list = field(default_factory=list)  # EvalResult of every evaluation so far
    pending: dict[str, float] = field(default_factory=dict)  # metrics logged with the next step
    queued: dict[int, Any] = field(default_factory=dict)  # step -> Sampled, generated but not trained on
    skipped_in_a_row: int = 0  # steps whose update was skipped (non-finite gradients), consecutively
    wandb_id: str | None = None
    samples_bytes: int = 0  # length of samples.jsonl at the checkpoint
    rng: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """The driver's RNG states as plain data (tuples, lists of ints, numbers), for run.json."""
    import numpy as np
    import torch

    numpy = np.random.get_state(legacy=False)
    numpy["state"] = {"key": numpy["state"]["key"].tolist(), "pos": int(numpy["state"]["pos"])}
    return {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state().tolist()}


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what `capture_rng` took (nothing for an empty state)."""
    import numpy as np
    import torch

    if state:
        random.setstate(state["python"])
        numpy = dict(state["numpy"], state={**state["numpy"]["state"],
                                            "key": np.asarray(state["numpy"]["state"]["key"], dtype=np.uint32)})
        np.random.set_state(numpy)
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# Fields given to a state class after checkpoints were first written without them: an older
# run.json may lack exactly these (they take their defaults); every other field must be there.
ADDED_LATER = {"Completion": {"mask", "turns", "info"}, "Prompt": {"answer", "metadata"}}


def state_types() -> dict[str, type]:
    """The only classes run.json may hold, by tag: what a `RunState` is made of."""
    from actors.scoring import Score
    from actors.types import Completion, Group, Prompt
    from orchestration.train.evaluation import EvalResult
    from orchestration.train.producer import Sampled
    from tasks.base import Problem

    return {cls.__name__: cls for cls in (RunState, EvalResult, Sampled, Group, Prompt, Completion, Score, Problem)}


def to_json(value: Any, types: dict[str, type]) -> Any:
    """`value` as JSON data. JSON's own types stay as they are (floats exactly: JSON writes their
    shortest repr, NaN and infinities included); the rest become one-key tagged objects: a
    `types` dataclass `{"$Name": {field: ...}}`, a tuple `{"$tuple": [...]}`, a dict with keys
    JSON cannot hold or that start with "$" `{"$dict": [[key, value], ...]}`. Anything else
    (a dataset column of another type) is kept as the reward server saw it (`plain`)."""
    from actors.reward_server import plain

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [to_json(v, types) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [to_json(v, types) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: to_json(v, types) for k, v in value.items()}
        return {"$dict": [[to_json(k, types), to_json(v, types)] for k, v in value.items()]}
    name = type(value).__name__
    if is_dataclass(value) and types.get(name) is type(value):
        return {f"${name}": {f.name: to_json(getattr(value, f.name), types) for f in fields(value)}}
    return to_json(plain(value), types)


def from_json(value: Any, types: dict[str, type]) -> Any:
    """The inverse of `to_json`; ValueError for a tag it does not know or a malformed one."""
    if isinstance(value, list):
        return [from_json(v, types) for v in value]
    if not isinstance(value, dict):
        return value
    tags = [k for k in value if k.startswith("$")]
    if not tags:
        return {k: from_json(v, types) for k, v in value.items()}
    if len(value) != 1:
        raise ValueError(f"a tagged object with other keys: {sorted(value)[:4]}")
    tag, inner = tags[0][1:], value[tags[0]]
    if tag == "tuple" and isinstance(inner, list):
        return tuple(from_json(v, types) for v in inner)
    if tag == "dict" and isinstance(inner, list) and all(isinstance(p, list) and len(p) == 2 for p in inner):
        return {from_json(k, types): from_json(v, types) for k, v in inner}
    cls = types.get(tag)
    names = {f.name for f in fields(cls)} if cls is not None else set()
    if cls is None or not isinstance(inner, dict) or not names - ADDED_LATER.get(tag, set()) <= set(inner) <= names:
        raise ValueError(f"unknown or malformed tag ${tag[:40]}")
    return cls(**{k: from_json(v, types) for k, v in inner.items()})


class Checkpoints:
    """The checkpoints of one run directory."""

    def __init__(self, output_dir: str | Path, keep: int = 2):
        self.root = Path(output_dir).resolve() / "checkpoints"
        self.keep = keep

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / COMPLETE).is_file())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def check_shared(self, write_markers: Callable[[str, str], list[str]]) -> None:
        """Every learner rank's writes under the run directory are visible here (ConfigError, one line,
        otherwise): ranks write their checkpoint shards on their own nodes, and only storage that
        every learner node shares with the driver makes a checkpoint the driver marks COMPLETE whole.
        `write_markers(directory, name)` has each rank write `directory/name-rank{r}`."""
        probe = self.root / ".storage-check"
        name = secrets.token_hex(8)
        nodes = write_markers(str(probe), name)
        try:
            missing = [r for r in range(len(nodes)) if not (probe / f"{name}-rank{r}").is_file()]
        finally:
            shutil.rmtree(probe, ignore_errors=True)
        if missing:
            where = ", ".join(f"rank {r} on {nodes[r]}" for r in missing)
            raise ConfigError(f"output_dir {self.root.parent} is not on storage the driver shares with learner {where}: "
                              f"checkpoint shards would stay on those nodes and resume would fail; put output_dir "
                              f"on a filesystem every learner node mounts (NFS, Lustre, a mounted bucket), as an "
                              f"absolute path")

    def write(self, step: int, fill: Callable[[Path], None]) -> Path:
        """Create checkpoint `step`: `fill(directory)` writes its files into a staging directory
        that becomes `step_N` only when complete; then older checkpoints beyond `keep` go. Raises
        CheckpointError (the staging directory removed) when writing fails, e.g. on a full disk."""
        final = self.root / f"step_{step:08d}"

        def fill_then_mark(staging: Path) -> None:
            fill(staging)
            write_synced(staging / COMPLETE, f"step {step}\n")  # last: a directory without it is never read

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".partial-*"):  # a write a crash interrupted
                shutil.rmtree(stale, ignore_errors=True)
            write_dir_atomic(final, fill_then_mark, staging=self.root / f".partial-{final.name}", fsync=True)
        except Exception as err:
            previous = self.latest()
            raise CheckpointError(f"checkpoint of step {step} not written ({type(err).__name__}: {err}); "
                                  f"{'the newest complete one is ' + str(previous) if previous else 'none exists yet'}"
                                  ) from err
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def write_driver_files(directory: Path, state: RunState, config: dict[str, Any], run_dir: Path) -> None:
    """The driver's part of a checkpoint: run state, metrics so far, config summary."""
    document = {"format": STATE_FORMAT, "state": to_json(state, state_types())}
    write_synced(directory / STATE_FILE, json.dumps(document))
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        shutil.copyfile(metrics, directory / "metrics.jsonl")
    summary = {"step": state.step, "version": state.version, "config": config}
    write_synced(directory / "state.json", json.dumps(summary, indent=1, default=str))


def read_state(checkpoint: Path) -> RunState:
    """The driver's state in `checkpoint`; ConfigError (one line) when it is not a run.json of
    this format (a pickle of an older raygrpo included: it is never loaded)."""
    check_state_file(checkpoint)
    path = checkpoint / STATE_FILE
    try:
        document = json.loads(path.read_text())
        if not (isinstance(document, dict) and document.get("format") == STATE_FORMAT):
            raise ValueError(f"not format {STATE_FORMAT}")
        state = from_json(document["state"], state_types())
        if not isinstance(state, RunState):
            raise ValueError("no run state in it")
    except (ValueError, TypeError, KeyError) as err:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{path} is not a raygrpo driver state ({type(err).__name__}: {err})") from err
    return state


def check_state_file(checkpoint: Path) -> None:
    """ConfigError when `checkpoint` has no run.json: it was written by an older raygrpo (run.pkl)."""
    if (checkpoint / STATE_FILE).is_file():
        return
    if (checkpoint / OLD_STATE_FILE).exists():
        raise ConfigError(f"checkpoint {checkpoint} was written by an older raygrpo: its driver state is a pickle "
                          f"({OLD_STATE_FILE}), which is not loaded (loading a pickle can run any code in it)")
    raise ConfigError(f"checkpoint {checkpoint} holds no {STATE_FILE}")


def restore_run_files(checkpoint: Path, run_dir: Path, state: RunState) -> None:
    """Put the run directory's logs back as they were at the checkpoint: metrics.jsonl from the
    checkpoint, samples.jsonl cut to its length then (rows logged after it are logged again)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = checkpoint / "metrics.jsonl"
    if saved.exists():
        shutil.copyfile(saved, run_dir / "metrics.jsonl")
    samples = run_dir / "samples.jsonl"
    if samples.exists():
        with open(samples, "r+b") as f:
            f.truncate(min(state.samples_bytes, os.path.getsize(samples)))


def choose_resume(cfg: Any) -> Path | None:
    """The checkpoint to resume from per `resume` (auto / never / a path), checked against `cfg`;
    ConfigError (one line) when there is nothing to resume or the config may not resume it."""
    checkpoints = Checkpoints(cfg.output_dir)
    if cfg.resume == "never":
        newest = checkpoints.latest()
        if newest is not None:
            raise ConfigError(f"{cfg.output_dir} holds checkpoints of an earlier run (newest: {newest.name}): "
                              f"resume=auto continues it; or choose another output_dir, or delete {checkpoints.root}")
        return None
    if cfg.resume == "auto":
        chosen = checkpoints.latest()
        if chosen is None:
            log.warning("resume=auto: no complete checkpoint in %s; starting from step 0", checkpoints.root)
            return None
    else:
        chosen = Path(cfg.resume).expanduser().resolve()
        if not (chosen / COMPLETE).is_file():
            raise ConfigError(f"resume={cfg.resume}: not a complete checkpoint directory (no {COMPLETE} file)")
    check_state_file(chosen)
    check_compatible(json.loads((chosen / "state.json").read_text())["config"], config_dict(cfg), chosen)
    return chosen


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Raise ConfigError naming the `FIXED` settings that differ; warn about other changes that
    make the resumed run inexact."""
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(set(old) | set(new))
    changed = [k for k in keys if old.get(k) != new.get(k)]
    fixed = [k for k in changed if _under(k, FIXED)]
    if fixed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in fixed[:4])
        raise ConfigError(f"checkpoint {where} was written by another config: {shown}{' ...' if len(fixed) > 4 else ''}; "
                          f"these may not change on resume ({', '.join(FIXED)}); other settings may")
    inexact = [k for k in changed if not _under(k, EXACT_ANYWAY)]
    if inexact:
        log.warning("resuming with changed settings (the run continues, but not bit for bit): %s", ", ".join(inexact))


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain containers (what a run records and a resume compares)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
