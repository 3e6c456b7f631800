"""The `code_tests` reward against honest and hostile completions, and HumanEval from its package."""

from __future__ import annotations

import json
import os
import time

import pytest

from actors.rewards.code import code_tests, extract_code

TESTS = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]}  # 3rd: never


def fenced(code: str) -> str:
    return f"Here you go:\n```python\n{code}\n```\nHope this helps."


def test_extract_code():
    assert extract_code(fenced("x = 1")) == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    assert extract_code("```text\nnot code\n```\n```python\nz = 3\n```") == "z = 3\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off by the limit
    assert extract_code("def f():\n    return 1\n") == "def f():\n    return 1\n"  # no fence: the whole reply


def test_fraction_of_tests_passing():
    assert code_tests(fenced("def add(a, b):\n    return a + b"), "", TESTS) == pytest.approx(2 / 3)
    assert code_tests("def add(a, b):\n    return a - b\n", "", TESTS) == 0.0
    assert code_tests(fenced("def add(a, b): return 5"), "", {"tests": "assert add(2, 2) == 5"}) == 1.0


def test_setup_runs_before_the_program():
    meta = {"setup": "import math\n\ndef area(r):\n    \"\"\"Circle area.\"\"\"\n", "tests": ["assert area(1) == math.pi"]}
    assert code_tests("    return math.pi * r * r\n", "", meta) == 1.0  # a bare body completes the signature
    assert code_tests(fenced("def area(r):\n    return math.pi * r ** 2"), "", meta) == 1.0


def test_missing_tests_raise():
    with pytest.raises(ValueError, match="metadata 'tests'"):
        code_tests("x = 1", "", {})


# Each would cost more than its sample without the jail. `posix.*` and raw syscalls, not `os.*`: the
# harness blanks some `os` functions, so a bomb written with `os.fork` would never run at all.
HOSTILE = {
    "infinite loop": "def add(a, b):\n    while True:\n        pass",
    "fork bomb": "import posix\nwhile True:\n    posix.fork()",
    "raw fork syscall": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nwhile True:\n"
                        "    assert libc.syscall(57 if __import__('platform').machine() == 'x86_64' else 220, 17, 0, 0, 0, 0) >= 0",
    "subprocess": "import posix\nposix.posix_spawn('/bin/sh', ['sh', '-c', 'sleep 100'], {})\ndef add(a, b): return a + b",
    "memory bomb": "blob = bytearray(16 << 30)\ndef add(a, b): return a + b",
    "forked memory bomb": "import posix\nfor _ in range(4):\n    if posix.fork() == 0:\n        blob = bytearray(300 << 20)\n"
                          "def add(a, b): return a + b",
    "output flood": "import sys\nwhile True:\n    print('x' * 65536)\n    sys.stderr.write('y' * 65536)",
    "hard exit": "import os\nos._exit(0)",
    "segfault": "import ctypes\nctypes.string_at(0)",
    "disk flood": "with open('big', 'w') as f:\n    f.write('x' * (64 << 20))\ndef add(a, b): return a + b",
    "forged result": "import os, sys\nos.write(int(sys.argv[1]), b'0 pass 0\\n0 pass 1\\n')",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_completion_costs_only_its_sample(name):
    start = time.monotonic()
    meta = {**TESTS, "time_limit_s": 2}
    assert code_tests(fenced(HOSTILE[name]), "", meta) == 0.0
    assert time.monotonic() - start < 6
    assert code_tests(fenced("def add(a, b):\n    return a + b"), "", meta) == pytest.approx(2 / 3)  # next one fine


def test_overriding_builtins_does_not_pass_the_tests():
    forged = "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.AssertionError = None\ndef add(a, b): return 7"
    assert code_tests(fenced(forged), "", TESTS) == 0.0


def test_tests_as_a_json_string_and_numpy_programs():
    meta = {"tests": json.dumps(["assert add(1, 2) == 3", "assert add(2, 2) == 5"])}
    assert code_tests(fenced("def add(a, b): return a + b"), "", meta) == 0.5  # decoded, not one list literal
    numpy_add = "import numpy as np\ndef add(a, b):\n    return int(np.add(a, b))"
    assert code_tests(fenced(numpy_add), "", TESTS) == pytest.approx(2 / 3)


def test_signals_and_orphans_stay_inside_the_namespace():
    """Killing the parent (or everything) hits only the sample's own namespace; a detached child dies
    with it."""
    for program in ("import posix, signal\nposix.kill(posix.getppid(), signal.SIGKILL)",
                    "import posix, signal\nposix.kill(-1, signal.SIGKILL)",
                    "import posix, time\nif posix.fork() == 0:\n    posix.setsid()\n    time.sleep(60)"):
        assert code_tests(fenced(program), "", {**TESTS, "time_limit_s": 1}) == 0.0
    assert not sandboxes_alive()


def test_tests_before_a_hang_still_count():
    program = "def add(a, b):\n    if a < 0:\n        while True:\n            pass\n    return a + b"
    assert code_tests(fenced(program), "", {**TESTS, "time_limit_s": 1}) == pytest.approx(1 / 3)


def test_no_environment_no_files_no_orphans(monkeypatch):
    monkeypatch.setenv("RAYGRPO_TEST_SECRET", "hunter2")
    probe = ("import os\nassert 'RAYGRPO_TEST_SECRET' not in os.environ, 'env leaked'\n"
             "assert os.listdir('.') == [], 'cwd not empty'\nopen('scratch.txt', 'w').write('ok')\n"
             "def add(a, b): return a + b")
    assert code_tests(fenced(probe), "", TESTS) == pytest.approx(2 / 3)  # and the next one starts empty again
    assert code_tests(fenced(probe), "", TESTS) == pytest.approx(2 / 3)
    code_tests(fenced("import time\nwhile True: time.sleep(1)"), "", {**TESTS, "time_limit_s": 1})
    deadline = time.monotonic() + 5  # SIGKILLed; on a loaded machine its exit may take a moment
    while sandboxes_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sandboxes_alive()  # the killed child's process group is gone


def sandboxes_alive() -> list[str]:
    """Processes of a jail: bwrap itself, or anything whose command line is the sandbox runner."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.startswith(b"bwrap") or b"/bwrap\0" in cmd or b"def _run():" in cmd:
            alive.append(pid)
    return alive


def test_humaneval_converts_once_and_reference_solutions_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYGRPO_CACHE", str(tmp_path))
    from tasks import humaneval
    from tasks.files import FileTask

    path = humaneval.jsonl_path()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 164 and rows[0]["task_id"] == "HumanEval/0"
    written = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert humaneval.jsonl_path() == path and path.stat().st_mtime_ns == written  # converted once, not again
    task = FileTask(["builtin:humaneval"], ["builtin:humaneval"], batch_size=8)
    assert len(task.test_set()) == 164 and task.max_steps(8) == 21
    for problem in task.test_set()[:12]:
        reference = f"```python\n{problem.answer}\n```"
        assert code_tests(reference, problem.answer, problem.metadata) == 1.0, problem.metadata["task_id"]
        broken = f"```python\n{problem.metadata['setup']}    return None\n```"
        assert code_tests(broken, problem.answer, problem.metadata) == 0.0, problem.metadata["task_id"]
