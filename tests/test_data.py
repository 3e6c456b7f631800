"""The user's data files (tasks/files.py): formats, schema, bad rows, order; the CLI's error path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.files import DataError, FileTask, load_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYGRPO_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


GOOD = [
    {"prompt": "What is 2 + 2?", "answer": "4", "level": 1},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 3?"}],
     "answer": "6", "level": 2},
    {"prompt": "What is 6 * 7?", "answer": 42, "level": 3},  # a number becomes "42"
]


def test_jsonl_rows_prompts_answers_and_metadata(tmp_path):
    loaded = load_file(str(write_jsonl(tmp_path / "train.jsonl", GOOD)), "prompt", "answer")
    assert loaded.skipped == []
    first, chat, number = loaded.problems
    assert (first.prompt, first.answer, first.metadata, first.source) == ("What is 2 + 2?", "4", {"level": 1},
                                                                          "train.jsonl:1")
    assert chat.prompt == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 3?"})
    assert number.answer == "42" and number.metadata == {"level": 3}


def test_malformed_rows_are_skipped_and_counted(tmp_path, caplog):
    lines = [GOOD[0], "{not json", {"prompt": "no answer here"}, {"prompt": "", "answer": "1"},
             {"prompt": 7, "answer": "1"}, {"prompt": "x?", "answer": ["a", "list"]},
             {"prompt": [{"role": "user"}], "answer": "1"}, "[1, 2]", GOOD[2]]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    with caplog.at_level("WARNING", logger="raygrpo"):
        loaded = load_file(str(path), "prompt", "answer")
    assert [p.answer for p in loaded.problems] == ["4", "42"]
    assert len(loaded.skipped) == 7
    assert loaded.skipped[0].startswith("line 2: not valid JSON")
    reasons = " | ".join(loaded.skipped)
    for reason in ("line 3: missing answer", "line 4: empty prompt", "line 5: prompt is a int",
                   "line 6: answer is a list", "line 7: prompt messages need a role", "line 8: row is a list"):
        assert reason in reasons
    assert "mixed.jsonl: skipped 7 bad rows (line 2: not valid JSON" in caplog.text


def test_numbers_are_read_as_written(tmp_path):
    """Arrow would turn a column of 3 and 2.5 into floats (3.0); answers keep their written form."""
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a", "answer": 3}, {"prompt": "b", "answer": 2.5},
                                              {"prompt": "c", "answer": 12345678901234567}])
    assert [p.answer for p in load_file(str(path), "prompt", "answer").problems] == ["3", "2.5", "12345678901234567"]


def test_json_array_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(GOOD[:1] + [{"prompt": "q", "answer": "a"}]))
    assert [p.answer for p in load_file(str(path), "prompt", "answer").problems] == ["4", "a"]


def verl_rows() -> list[dict]:
    return [{"data_source": "openai/gsm8k",
             "prompt": [{"role": "user", "content": f"Natalia sold {i} clips. How many? Let's think step by step."}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
             "extra_info": {"split": "train", "index": i}} for i in range(5)]


def test_parquet_in_verl_schema(tmp_path):
    import datasets

    path = tmp_path / "gsm8k_train.parquet"
    datasets.Dataset.from_list(verl_rows()).to_parquet(str(path))
    task = FileTask([str(path)], [], answer_key="reward_model.ground_truth", batch_size=5)
    problems = sorted(task.train_batch(0, 5), key=lambda p: p.metadata["extra_info"]["index"])
    assert [p.answer for p in problems] == ["0", "2", "4", "6", "8"]
    assert problems[3].prompt == ({"role": "user", "content": "Natalia sold 3 clips. How many? Let's think step by step."},)
    assert problems[3].metadata["data_source"] == "openai/gsm8k"
    assert problems[3].metadata["reward_model"]["style"] == "rule"  # the answer's column stays as metadata
    assert task.stats() == {"data/skipped_rows": 0.0, "data/train_rows": 5.0, "data/val_rows": 0.0}


def test_save_to_disk_directory_and_splits(tmp_path):
    import datasets

    numpy_formatted = datasets.Dataset.from_list([{"prompt": "q", "answer": 7}, {"prompt": "r", "answer": 8}])
    numpy_formatted.with_format("numpy").save_to_disk(str(tmp_path / "numpy"))
    assert [p.answer for p in load_file(str(tmp_path / "numpy"), "prompt", "answer").problems] == ["7", "8"]
    with_nan = tmp_path / "nan.parquet"
    datasets.Dataset.from_list([{"prompt": "q", "answer": float("nan")}, {"prompt": "r", "answer": 1.5}]).to_parquet(
        str(with_nan))
    loaded = load_file(str(with_nan), "prompt", "answer")
    assert [p.answer for p in loaded.problems] == ["1.5"] and loaded.skipped == ["row 1: answer is nan"]

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:])}).save_to_disk(str(tmp_path / "splits"))
    assert len(load_file(str(tmp_path / "plain"), "prompt", "answer").problems) == 4
    task = FileTask([str(tmp_path / "splits")], [str(tmp_path / "splits")], batch_size=1)
    assert [p.answer for p in task.test_set()] == ["3"] and [p.id for p in task.test_set()] == ["val/0"]
    assert sorted(p.answer for s in range(3) for p in task.train_batch(s, 1)) == ["0", "1", "2"]


@pytest.mark.parametrize("content, message", [
    (None, "data file not found: {path}"),
    ('{"prompt": "", "answer": "1"}\n{"question": "q"}\n', "no valid row in data file {path} (2 skipped; first: row 1: "),
    ("{broken\n", "no valid row in data file {path} (1 skipped; first: line 1: not valid JSON"),
])
def test_unusable_files_raise_one_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as info:
        FileTask([str(path)], [])
    assert str(info.value).startswith(message.format(path=path)) and "\n" not in str(info.value)


def test_unreadable_and_unsupported_files(tmp_path):
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"cannot read data file .*corrupt\.parquet"):
        load_file(str(bad), "prompt", "answer")
    (tmp_path / "rows.csv").write_text("prompt,answer\nq,a\n")
    with pytest.raises(DataError, match=r"unsupported data file .*rows\.csv"):
        load_file(str(tmp_path / "rows.csv"), "prompt", "answer")


def numbered(tmp_path: Path, n: int) -> str:
    return str(write_jsonl(tmp_path / "n.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(n)]))


def test_batches_are_deterministic_per_seed(tmp_path):
    path = numbered(tmp_path, 20)
    a, b, c = (FileTask([path], [], seed=s, batch_size=4) for s in (1, 1, 2))
    batches = lambda t: [[p.answer for p in t.train_batch(s, 4)] for s in range(5)]  # noqa: E731
    assert batches(a) == batches(b) and batches(a) != batches(c)
    assert a.train_batch(3, 4) == FileTask([path], [], seed=1, batch_size=4).train_batch(3, 4)  # no hidden state
    assert a.train_batch(2, 4, round=1) == b.train_batch(2, 4, round=1) != a.train_batch(2, 4, round=2)
    main, extra = a.train_batch(2, 4), a.train_batch(2, 4, round=1)
    assert len({p.answer for p in extra}) == 4 and not {p.answer for p in main} & {p.answer for p in extra}
    ids = [p.id for p in main + extra]
    assert len(set(ids)) == 8 and ids[0] == "train/2/0" and ids[4] == "train/2.1/0"


def test_epochs_cover_every_row_once_then_reshuffle(tmp_path):
    task = FileTask([numbered(tmp_path, 10)], [], seed=0, batch_size=4, epochs=2)
    assert task.max_steps(4) == 5  # ceil(2 × 10 / 4)
    stream = [p.answer for s in range(5) for p in task.train_batch(s, 4)]
    first, second = stream[:10], stream[10:20]
    assert sorted(first, key=int) == sorted(second, key=int) == [str(i) for i in range(10)]
    assert first != second  # a fresh permutation per epoch
    in_order = FileTask([numbered(tmp_path, 10)], [], batch_size=4, shuffle=False)
    assert [p.answer for p in in_order.train_batch(1, 4)] == ["4", "5", "6", "7"]


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WANDB_API_KEY")}
    env["RAYGRPO_CACHE"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, "-m", "orchestration", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("content", [None, '{"prompt": "no answer"}\n'])
def test_cli_bad_data_exits_2_with_one_line(tmp_path, content):
    path = tmp_path / "train.jsonl"
    if content is not None:
        path.write_text(content)
    res = run_cli(tmp_path, f"data.train_files=[{path}]", "dry_run=true")
    errors = [line for line in res.stderr.splitlines() if line.startswith("raygrpo: error:")]
    assert res.returncode == 2 and len(errors) == 1, res.stderr
    assert str(path) in errors[0] and ("not found" in errors[0] if content is None else "no valid row" in errors[0])
    assert "Traceback" not in res.stderr and "Started a local Ray" not in res.stderr + res.stdout


def test_prompt_messages_put_the_system_message_first_unless_the_chat_has_one():
    from actors.types import Prompt

    assert Prompt("a", "Hi?", system="Be brief.").messages() == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    chat = ({"role": "system", "content": "Own."}, {"role": "user", "content": "Hi?"})
    assert Prompt("b", chat, system="Be brief.").messages() == [dict(m) for m in chat]
    assert Prompt("c", chat[1:]).messages() == [{"role": "user", "content": "Hi?"}]


def test_boolean_answers_are_skipped_not_read_as_numbers(tmp_path):
    """`true` is an int to Python; a reference answer of true/false is a wrong type, not "True"/"1"."""
    path = tmp_path / "bools.jsonl"
    path.write_text('{"prompt": "2 > 1?", "answer": true}\n{"prompt": "1 > 2?", "answer": false}\n'
                    '{"prompt": "1 + 1?", "answer": 2}\n')
    loaded = load_file(str(path), "prompt", "answer")
    assert [p.answer for p in loaded.problems] == ["2"]
    assert loaded.skipped == ["row 1: answer is a bool, not a string or a number",
                              "row 2: answer is a bool, not a string or a number"]
