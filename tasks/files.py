"""The user's own data: prompts and answers from JSONL, JSON, Parquet or `save_to_disk` directories.

Files load with HF `datasets` (cached under `$RAYGRPO_CACHE/datasets`). Each row needs a prompt
(`data.prompt_key`: a string, or a list of chat messages `{"role", "content"}` used as is with
the chat template) and a reference answer (`data.answer_key`; a dotted path such as
`reward_model.ground_truth` reaches a nested field; numbers become strings). Every other column
travels with the prompt as `metadata`, for reward functions that ask for it.

Bad rows — a missing or empty prompt or answer, a value of the wrong type, a JSON line that does
not parse — are skipped and counted (`stats()["data/skipped_rows"]`), with the first few named in
the log. A file that does not exist, cannot be read, or holds no valid row raises `DataError`
(one line naming the file) before any actor starts.

Metadata holds the row's other columns as `datasets` reads them (a column missing from a JSON row
is None there). Order: the training rows are one stream of epochs, each a fresh permutation drawn from `seed`
(or file order with `shuffle=False`); step s takes positions [s·P, (s+1)·P) of that stream, so
the batches are a pure function of (seed, step) and a run can be repeated or resumed exactly.
A batch may run across an epoch boundary; `max_steps` is ceil(epochs · rows / P). Extra rounds
of dynamic sampling draw distinct rows outside the step's batch from a separate seeded stream,
leaving the main order as is.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

from common.errors import ConfigError
from common.models import cache_root
from tasks.base import Problem, stable_seed

log = logging.getLogger("raygrpo")

ROLES = ("system", "user", "assistant", "tool")
SHOW_SKIPPED = 5  # rows named in the log per file


class DataError(ConfigError):
    """A data file that cannot be used; the message names the file."""


@dataclass
class LoadedFile:
    problems: list[Problem]  # valid rows; id = source until a batch renames them
    skipped: list[str]  # "row N: reason" per bad row


def resolve_data_path(path: str) -> Path:
    """A local path, or a built-in data set converted once into the cache (`builtin:humaneval`)."""
    if path.startswith("builtin:"):
        from tasks import humaneval

        if path != "builtin:humaneval":
            raise DataError(f"unknown built-in data set {path!r} (known: builtin:humaneval)")
        return humaneval.jsonl_path()
    return Path(path).expanduser()


def field_at(row: dict[str, Any], key: str) -> Any:
    """`row[key]`, where a dotted key walks nested dicts (`reward_model.ground_truth`)."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def parse_prompt(value: Any) -> str | tuple[dict[str, str], ...]:
    """A prompt string, or chat messages as a tuple of {role, content}; raises ValueError."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("empty prompt")
        return value
    if isinstance(value, (list, tuple)) and value:
        messages = []
        for m in value:
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError("prompt messages need a role (system/user/assistant/tool) and string content")
            messages.append({"role": m["role"], "content": m["content"]})
        if not any(m["content"].strip() for m in messages):
            raise ValueError("empty prompt")
        return tuple(messages)
    raise ValueError("missing prompt" if value is None or value == [] else
                     f"prompt is a {type(value).__name__}, not a string or a list of chat messages")


def parse_answer(value: Any) -> str:
    """The reference answer as a non-empty string (numbers are converted); raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("missing answer" if value is None else
                         f"answer is a {type(value).__name__}, not a string or a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"answer is {value}")
    text = str(value)
    if not text.strip():
        raise ValueError("empty answer")
    return text


def to_problem(row: Any, prompt_key: str, answer_key: str, source: str) -> Problem:
    """One row as a Problem; raises ValueError saying what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, not an object")
    prompt = parse_prompt(field_at(row, prompt_key))
    answer = parse_answer(field_at(row, answer_key))
    metadata = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
    return Problem(id=source, prompt=prompt, answer=answer, metadata=metadata, source=source)


def read_rows(path: Path, split: str, answer_key: str) -> tuple[Iterable[tuple[str, Any]], list[str]]:
    """(row label, row) pairs of one file, and the lines that did not parse (JSON only)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a JSON file it cannot parse is ours to report
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            data = _pick_split(data, split, path)
        return _labelled(data.with_format(None)), []  # python values, whatever format it was saved with
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unsupported data file {path} (use .jsonl, .json, .parquet or a save_to_disk directory)")
    try:
        data = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache_root() / "datasets"))
    except Exception:
        if kind != "json":
            raise
        return _json_lines(path)  # a line that does not parse, or columns of mixed types: row by row
    if kind == "json" and _float_column(data, answer_key):
        return _json_lines(path)  # Arrow turned ints into floats (3 → 3.0): read the values as written
    return _labelled(data), []


def _float_column(data, key: str) -> bool:
    feature = data.features.get(key)
    return getattr(feature, "dtype", "").startswith("float")


def _labelled(data) -> Iterable[tuple[str, Any]]:
    return ((f"row {i + 1}", row) for i, row in enumerate(data))


def _pick_split(data, split: str, path: Path):
    names = {"train": ("train",), "val": ("validation", "test", "val")}[split]
    chosen = next((n for n in names if n in data), next(iter(data)) if len(data) == 1 else None)
    if chosen is not None:
        log.info("%s: using split %r", path, chosen)
        return data[chosen]
    raise DataError(f"{path} holds splits {sorted(data)}; none is named {' or '.join(names)}")


def _json_lines(path: Path) -> tuple[list[tuple[str, Any]], list[str]]:
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append(f"line {n}: not valid JSON ({e.msg})")
    return rows, bad


def load_file(path_or_builtin: str, prompt_key: str, answer_key: str, split: str = "train") -> LoadedFile:
    """Every valid row of one file; raises DataError when there is none or the file is unusable."""
    path = resolve_data_path(path_or_builtin)
    if not path.exists():
        raise DataError(f"data file not found: {path_or_builtin}")
    try:
        rows, skipped = read_rows(path, split, answer_key)
        problems = []
        for label, row in rows:
            try:
                problems.append(to_problem(row, prompt_key, answer_key, f"{path.name}:{label.split()[-1]}"))
            except ValueError as e:
                skipped.append(f"{label}: {e}")
    except DataError:
        raise
    except Exception as e:  # unreadable: permissions, a corrupt Parquet file, ...
        raise DataError(f"cannot read data file {path_or_builtin}: {type(e).__name__}: {_one_line(e)}") from None
    if not problems:
        first = f"; first: {skipped[0]}" if skipped else ""
        raise DataError(f"no valid row in data file {path_or_builtin} ({len(skipped)} skipped{first}; "
                        f"prompt_key={prompt_key!r}, answer_key={answer_key!r})")
    if skipped:
        log.warning("%s: skipped %d bad rows (%s%s)", path_or_builtin, len(skipped), "; ".join(skipped[:SHOW_SKIPPED]),
                    "; ..." if len(skipped) > SHOW_SKIPPED else "")
    return LoadedFile(problems, skipped)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


class FileTask:
    """Problems from the user's files (see the module docstring for order and bad rows).

    Args:
        train_files / val_files: paths (or `builtin:` data sets); empty lists are allowed.
        prompt_key / answer_key: columns (dotted paths reach nested fields).
        seed: seed of the per-epoch shuffles and of dynamic sampling's extra draws.
        batch_size: prompts per step (P); step s starts at stream position s·P.
        epochs: passes over the training rows.
        shuffle: a fresh permutation per epoch (False: file order every epoch).
    """

    def __init__(self, train_files: list[str], val_files: list[str], *, prompt_key: str = "prompt",
                 answer_key: str = "answer", seed: int = 0, batch_size: int = 1, epochs: int = 1,
                 shuffle: bool = True) -> None:
        loaded = [load_file(f, prompt_key, answer_key, "train") for f in train_files]
        val = [load_file(f, prompt_key, answer_key, "val") for f in val_files]
        self.train = [p for part in loaded for p in part.problems]
        self.val = [replace(p, id=f"val/{i}") for i, p in enumerate(q for part in val for q in part.problems)]
        self.skipped = sum(len(part.skipped) for part in loaded + val)
        self.seed, self.batch_size, self.epochs, self.shuffle = seed, batch_size, epochs, shuffle
        self._order: tuple[int, list[int]] = (-1, [])

    def train_batch(self, step: int, n: int, round: int = 0) -> list[Problem]:
        if step < 0 or n < 0 or round < 0:
            raise ValueError(f"step, n and round must be >= 0, got {step=}, {n=}, {round=}")
        if round == 0:
            start = step * self.batch_size
            rows = [self._row_at(start + i) for i in range(n)]
        else:  # distinct rows, outside the step's main batch while there are enough
            rng = random.Random(stable_seed("extra", self.seed, step, round))
            main = {self._row_at(step * self.batch_size + i) for i in range(self.batch_size)}
            pool = [i for i in range(len(self.train)) if i not in main] or list(range(len(self.train)))
            rows = rng.sample(pool, min(n, len(pool)))
            rows += [rng.choice(pool) for _ in range(n - len(rows))]
        prefix = f"train/{step}" + (f".{round}" if round else "")
        return [replace(self.train[r], id=f"{prefix}/{i}") for i, r in enumerate(rows)]

    def test_set(self) -> list[Problem]:
        return list(self.val)

    def max_steps(self, prompts_per_step: int) -> int | None:
        return math.ceil(self.epochs * len(self.train) / prompts_per_step) if self.train else None

    def stats(self) -> dict[str, float]:
        return {"data/skipped_rows": float(self.skipped), "data/train_rows": float(len(self.train)),
                "data/val_rows": float(len(self.val))}

    def _row_at(self, position: int) -> int:
        """Index of the training row at `position` of the endless epoch stream."""
        epoch, offset = divmod(position, len(self.train))
        if self._order[0] != epoch:
            order = list(range(len(self.train)))
            if self.shuffle:
                random.Random(stable_seed("epoch", self.seed, epoch)).shuffle(order)
            self._order = (epoch, order)
        return self._order[1][offset]
