"""`code_tests`: run the program in a completion against the row's tests; the fraction that pass.

The row's metadata gives `tests` (a string of Python code, or a list of them — also as a JSON
string: each is one test, run after the program in a fresh copy of its namespace; it passes when
it raises nothing) and, optionally, `setup` (code run before the program: imports, a signature
to complete), `time_limit_s` and `memory_mb` (keep `time_limit_s` below `reward.timeout_s`).

Each sample runs in its own jail (`actors.sandbox`: bubblewrap with new user, mount, pid, net,
ipc and uts namespaces, a read-only view of the interpreter only, a tmpfs working directory, a
seccomp filter that refuses new processes, per-process limits, a wall clock). Without the jail it
fails closed: `code_tests` raises SandboxUnavailable (the sample is `failed`) and the run refuses
to start (`reward.code.sandbox`); only an explicit `sandbox=none` runs code unjailed.
Results come back, test by test, on a private pipe, each line tagged with a random nonce; tests
that passed before a hang or a crash still count. Inside its interpreter a completion can still
forge its own results (frame inspection, objects whose `__eq__` is always true): a test harness in
the program's process, as in every peer's, judges code, it cannot be a boundary against it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import secrets
from typing import Any, Callable

from actors.sandbox import Limits, run

TIME_LIMIT_S = 5.0  # wall clock per sample (CPU limit the same), unless metadata says otherwise
MEMORY_MB = 1024
DISK_MB = 16  # the sample's tmpfs working directory, and the largest file it may write

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
    write, run, tests = os.fdopen(int(sys.argv[1]), "w", buffering=1).write, exec, spec.pop("tests")
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


def run_tests(program: str, tests: list[str], time_limit_s: float = TIME_LIMIT_S, memory_mb: int = MEMORY_MB,
              sandbox: str = "bwrap") -> list[bool]:
    """Whether each test passed after running `program` in a jailed child process (a test that
    was not reached, because the program failed, hung or crashed, did not pass). Raises
    SandboxUnavailable where the jail cannot be set up (never runs the program without it unless
    `sandbox="none"`)."""
    nonce = secrets.token_hex(16)
    cpu_s = max(1, math.ceil(time_limit_s))
    limits = {"RLIMIT_CPU": cpu_s, "RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": DISK_MB << 20, "RLIMIT_CORE": 0}
    spec = {"nonce": nonce, "program": program, "tests": tests, "limits": limits}
    done = run(_RUNNER, json.dumps(spec).encode(), Limits(wall_s=time_limit_s, cpu_s=cpu_s, memory_mb=memory_mb,
                                                          disk_mb=DISK_MB), isolation=sandbox)
    passed = {int(n) for n in re.findall(rf"^{nonce} pass (\d+)$", done.report, re.MULTILINE)}
    return [i in passed for i in range(len(tests))]


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


def make_code_tests(sandbox: str = "bwrap") -> Callable[..., float]:
    """`code_tests` with its isolation chosen (`reward.code.sandbox`): "bwrap" (the jail, fail
    closed) or "none" (NO isolation: model-written code runs with the reward actor's rights)."""
    if sandbox not in ("bwrap", "none"):
        raise ValueError(f"sandbox must be bwrap or none, got {sandbox!r}")
    if sandbox == "none":
        log.warning("code_tests: reward.code.sandbox=none: model-written code runs WITHOUT isolation")

    def code_tests(completion: str, answer: str, metadata: dict[str, Any]) -> float:
        """Fraction of the row's `tests` that pass against the completion's program (see module)."""
        tests = parse_tests(metadata.get("tests"))
        program = extract_code(completion)
        if metadata.get("setup"):
            program = f"{metadata['setup']}\n{program}"
        results = run_tests(program, tests, float(metadata.get("time_limit_s") or TIME_LIMIT_S),
                            int(metadata.get("memory_mb") or MEMORY_MB), sandbox)
        return sum(results) / len(results)

    return code_tests


code_tests = make_code_tests("bwrap")
