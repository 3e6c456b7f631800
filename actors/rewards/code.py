"""`code_tests`: run the program in a completion against the row's tests; the fraction that pass.

The row's metadata gives `tests` (a string of Python code, or a list of them: each is one test,
run after the program in a fresh copy of its namespace; it passes when it raises nothing) and,
optionally, `setup` (code run before the program: imports, a signature to complete),
`time_limit_s` and `memory_mb`.

Each sample runs in a fresh `python -I` child process:
- in an empty temporary working directory, removed afterwards;
- with no inherited environment variables (only PATH, HOME/TMPDIR = that directory, LANG);
- under `resource.setrlimit` limits: CPU seconds, address space (`memory_mb`), file size
  (1 MiB), no new processes where the kernel enforces it (RLIMIT_NPROC; root is exempt), no core
  files; and a wall-clock limit, after which its whole process group is killed;
- with stdin/stdout/stderr on /dev/null (output flooding costs nothing but time), `os.fork`,
  `os.system`, `subprocess` and kin disabled (as OpenAI's HumanEval harness does), and killed
  with its parent (PR_SET_PDEATHSIG).
Results come back, test by test, on a private pipe: tests that passed before a hang or a crash
still count. A crash, a timeout, an infinite loop, a fork bomb or a memory bomb costs that sample
only. This is a guard against accidents and a small model's mischief, not a security boundary
against code written to escape: run untrusted code at scale in containers (nsjail, gVisor).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

TIME_LIMIT_S = 5.0  # wall clock per sample (CPU limit the same), unless metadata says otherwise
MEMORY_MB = 1024
MAX_FILE_BYTES = 1 << 20
MAX_RESULT_BYTES = 1 << 16

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)

# Runs in the child. Everything it needs stays in the function's locals; the program and tests
# run in a namespace of their own.
_RUNNER = r"""
def _run():
    import json, os, sys
    spec = json.loads(sys.stdin.read())
    out, nonce = os.fdopen(spec["fd"], "w", buffering=1), spec["nonce"]
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    import builtins, shutil, subprocess
    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "execv", "execve", "execvp",
                 "execvpe", "spawnv", "spawnve", "spawnvp", "posix_spawn", "posix_spawnp", "putenv",
                 "setuid", "removedirs", "rmdir", "chdir"):
        setattr(os, name, None)
    subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = None
    shutil.rmtree = shutil.move = None
    builtins.exit = builtins.quit = None
    ns = {"__name__": "__main__"}
    try:
        exec(compile(spec["program"], "<completion>", "exec"), ns)
    except BaseException as e:
        out.write(nonce + " error " + type(e).__name__ + "\n")
        return
    for i, test in enumerate(spec["tests"]):
        try:
            exec(compile(test, "<test %d>" % i, "exec"), dict(ns))
            out.write(nonce + " pass %d\n" % i)
        except BaseException:
            out.write(nonce + " fail %d\n" % i)
_run()
"""


def extract_code(completion: str) -> str:
    """The program in a reply: its first python (or untagged) fenced block, closed or cut off by
    the length limit; else the whole reply."""
    blocks = _FENCE.findall(completion)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3", ""):
            return body
    return completion if not blocks else blocks[0][1]


def _limits(cpu_s: int, memory_mb: int):
    def apply() -> None:  # runs in the child between fork and exec
        import ctypes
        import resource

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_tests(program: str, tests: list[str], time_limit_s: float = TIME_LIMIT_S,
              memory_mb: int = MEMORY_MB) -> list[bool]:
    """Whether each test passed after running `program` in a limited child process (a test that
    was not reached, because the program failed, hung or crashed, did not pass)."""
    nonce = secrets.token_hex(16)
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryDirectory(prefix="raygrpo-code-") as cwd:
        env = {"PATH": os.defpath, "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _RUNNER], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, cwd=cwd, env=env, pass_fds=(write_fd,), start_new_session=True,
                preexec_fn=_limits(max(1, int(time_limit_s + 0.999)), memory_mb))
        finally:
            os.close(write_fd)
        try:
            spec = {"fd": write_fd, "nonce": nonce, "program": program, "tests": tests}
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(json.dumps(spec).encode())
                proc.stdin.close()
            report = _read_until(read_fd, time.monotonic() + time_limit_s)
        finally:
            os.close(read_fd)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it managed to start
            proc.wait()
    passed = {int(n) for n in re.findall(rf"^{nonce} pass (\d+)$", report, re.MULTILINE)}
    return [i in passed for i in range(len(tests))]


def _read_until(fd: int, deadline: float) -> str:
    """What the child reports before it closes the pipe, the deadline or the size limit."""
    data = b""
    while len(data) < MAX_RESULT_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def code_tests(completion: str, answer: str, metadata: dict[str, Any]) -> float:
    """Fraction of the row's `tests` that pass against the completion's program (see module)."""
    tests = metadata.get("tests")
    if isinstance(tests, str):
        tests = [tests]
    if not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError("code_tests needs metadata 'tests': a string or a list of strings of Python code")
    program = extract_code(completion)
    if metadata.get("setup"):
        program = f"{metadata['setup']}\n{program}"
    results = run_tests(program, list(tests), float(metadata.get("time_limit_s") or TIME_LIMIT_S),
                        int(metadata.get("memory_mb") or MEMORY_MB))
    return sum(results) / len(results)
