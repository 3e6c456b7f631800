"""`code_tests`: run the program in a completion against the row's tests; the fraction that pass.

The row's metadata gives `tests` (a string of Python code, or a list of them — also as a JSON
string: each is one test, run after the program in a fresh copy of its namespace; it passes when
it raises nothing) and, optionally, `setup` (code run before the program: imports, a signature
to complete), `time_limit_s` and `memory_mb` (keep `time_limit_s` below `reward.timeout_s`).

Each sample runs in a fresh `python -I` child process:
- in its own PID and network namespace where the kernel allows it (`unshare`; tried once, with a
  warning where it is refused): nothing it starts outlives it, it cannot signal processes outside
  or open a connection;
- in an empty temporary working directory, removed afterwards, with no inherited environment
  variables (only PATH, HOME/TMPDIR = that directory, LANG);
- under `resource.setrlimit` limits: CPU seconds, address space (`memory_mb`), file size
  (1 MiB), 512 processes per user (root is exempt), no core files; and a wall-clock limit, after
  which its whole process group is killed;
- with stdin/stdout/stderr on /dev/null (output flooding costs nothing but time), `os.fork`,
  `os.system`, `subprocess` and kin set to None (as OpenAI's HumanEval harness does), builtins
  restored before each test, and killed with its parent (PR_SET_PDEATHSIG).
Results come back, test by test, on a private pipe: tests that passed before a hang or a crash
still count. A crash, a timeout, an infinite loop, a fork or memory bomb costs that sample only.
This is a guard against accidents and a policy's cruder exploits, not a security boundary: code
in the same interpreter as the harness can still reach it (frame inspection, the `posix` module,
objects whose `__eq__` is always true). Run untrusted code at scale in containers (nsjail, gVisor).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
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
MAX_PROCESSES = 512  # RLIMIT_NPROC counts the user's processes and threads; root is exempt

log = logging.getLogger("raygrpo")

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)

# Runs in the child: limits first, then the program and each test in namespaces of their own.
# What the harness needs is bound before the program runs, and builtins are restored per test.
_RUNNER = r"""
def _run():
    import builtins, ctypes, json, os, resource, signal, sys
    spec = json.loads(sys.stdin.read())
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    for name, value in spec["limits"].items():
        limit = getattr(resource, name)
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))
    write, run, tests = os.fdopen(spec.pop("fd"), "w", buffering=1).write, exec, spec.pop("tests")
    nonce, program = spec.pop("nonce"), compile(spec.pop("program"), "<completion>", "exec", dont_inherit=True)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    import shutil, subprocess
    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "execv", "execve", "execvp",
                 "execvpe", "spawnv", "spawnve", "spawnvp", "posix_spawn", "posix_spawnp", "setuid",
                 "removedirs", "rmdir", "chdir"):
        setattr(os, name, None)
    subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = None
    shutil.rmtree = shutil.move = None
    builtins.exit = builtins.quit = None
    saved = dict(vars(builtins))
    compiled = [compile(t, "<test %d>" % i, "exec", dont_inherit=True) for i, t in enumerate(tests)]
    ns = {"__name__": "__main__"}
    try:
        run(program, ns)
    except BaseException:
        return
    for i, test in enumerate(compiled):
        vars(builtins).update(saved)
        try:
            run(test, dict(ns))
        except BaseException:
            continue
        write("%s pass %d\n" % (nonce, i))
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


@functools.lru_cache(maxsize=1)
def _isolation() -> tuple[str, ...]:
    """The `unshare` prefix for a PID and network namespace per sample, or () where refused."""
    prefix = ["unshare", "--pid", "--fork", "--kill-child", "--net"]
    if os.geteuid() != 0:
        prefix[1:1] = ["--user", "--map-root-user"]
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        log.warning("code_tests: no PID/network namespace here (unshare refused); samples run without one")
    return tuple(prefix) if ok else ()


def run_tests(program: str, tests: list[str], time_limit_s: float = TIME_LIMIT_S,
              memory_mb: int = MEMORY_MB) -> list[bool]:
    """Whether each test passed after running `program` in a limited child process (a test that
    was not reached, because the program failed, hung or crashed, did not pass)."""
    nonce = secrets.token_hex(16)
    cpu_s = max(1, math.ceil(time_limit_s))
    limits = {"RLIMIT_CPU": cpu_s, "RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": MAX_FILE_BYTES,
              "RLIMIT_NPROC": MAX_PROCESSES, "RLIMIT_CORE": 0}
    read_fd, write_fd = os.pipe()
    try:
        with tempfile.TemporaryDirectory(prefix="raygrpo-code-") as cwd:
            env = {"PATH": os.defpath, "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8"}
            try:
                proc = subprocess.Popen([*_isolation(), sys.executable, "-I", "-c", _RUNNER], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd, env=env,
                                        pass_fds=(write_fd,), start_new_session=True)
            finally:
                os.close(write_fd)
            try:
                spec = {"fd": write_fd, "nonce": nonce, "program": program, "tests": tests, "limits": limits}
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(json.dumps(spec).encode())
                    proc.stdin.close()
                report = _read_until(read_fd, time.monotonic() + time_limit_s)
            finally:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the child and anything it managed to start
                proc.wait()
    finally:
        os.close(read_fd)
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


def parse_tests(tests: Any) -> list[str]:
    """A row's `tests` as a list of code strings (a JSON-encoded list is decoded); raises ValueError."""
    if isinstance(tests, str) and tests.lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            tests = json.loads(tests)
    if isinstance(tests, str):
        tests = [tests]
    if not tests or not isinstance(tests, (list, tuple)) or not all(isinstance(t, str) for t in tests):
        raise ValueError("code_tests needs metadata 'tests': a string or a list of strings of Python code")
    return list(tests)


def code_tests(completion: str, answer: str, metadata: dict[str, Any]) -> float:
    """Fraction of the row's `tests` that pass against the completion's program (see module)."""
    tests = parse_tests(metadata.get("tests"))
    program = extract_code(completion)
    if metadata.get("setup"):
        program = f"{metadata['setup']}\n{program}"
    results = run_tests(program, tests, float(metadata.get("time_limit_s") or TIME_LIMIT_S),
                        int(metadata.get("memory_mb") or MEMORY_MB))
    return sum(results) / len(results)
