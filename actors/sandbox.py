"""A sandbox for model-written code: one bubblewrap (`bwrap`) jail per run, fail closed.

Every program runs as `python -I` inside `bwrap` with
- new user, mount, pid, network, ipc, uts and cgroup namespaces; uid/gid 65534 inside, no
  capabilities, no further user namespaces (`--disable-userns`), killed with its parent;
- a root that holds only what the interpreter needs, read-only: /usr (and the /bin, /lib
  symlinks), the interpreter's prefix and the virtualenv; a fresh /proc (its own pid namespace
  only), a minimal /dev, a size-limited tmpfs working directory (`WORKDIR`, also HOME and
  TMPDIR); nothing else of the host's /etc, /home, /root, /run or /tmp; the root and /dev
  remounted read-only;
- an empty environment (PATH, HOME, TMPDIR, LANG and one-thread BLAS settings only);
- a seccomp filter (x86_64, aarch64): no new processes (fork, vfork, clone without
  CLONE_THREAD; clone3 reports ENOSYS so threads fall back to clone), no mounts, namespaces,
  ptrace, keyrings, bpf, perf, io_uring, kernel modules and the like;
- `setrlimit` limits set by the runner before it reads the untrusted program: CPU seconds,
  address space, file size, no core files; a wall clock enforced from outside.
Because a sample is one process (threads aside), per-process limits are per-sample limits and no
cgroup is needed: they hold wherever bwrap runs, as root or not. What they do not bound: threads
(each counts against the address-space limit) and kernel memory of the tmpfs beyond its size.

`unavailable()` says why the jail cannot be set up here (bwrap missing, user namespaces refused,
as in a container under a default seccomp profile), so callers can refuse at start-up; `run`
raises SandboxUnavailable rather than run anything without it. `isolation="none"` runs the same
runner without the jail: for trusted code only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

NOBODY = 65534
WORKDIR = "/sandbox"  # not /tmp: a virtualenv under the host's /tmp (a CI checkout) is bound at its own path
MAX_REPORT_BYTES = 1 << 16
ISOLATIONS = ("bwrap", "none")


class SandboxUnavailable(RuntimeError):
    """The jail cannot be set up on this machine; nothing was run."""


@dataclass(frozen=True)
class Limits:
    """Per-sample limits. `wall_s` is enforced from outside; the others by the kernel."""

    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 1024  # address space of the one process
    disk_mb: int = 16  # the tmpfs working directory (and the largest file)


@dataclass(frozen=True)
class Finished:
    """What a run left: its report (what the program wrote to its report fd, capped) and how it ended."""

    report: str
    timed_out: bool
    exit_code: int | None


# ----------------------------------------------------------------------------- seccomp

_DENIED = {  # syscall numbers denied with EPERM, per architecture (from the kernel's unistd headers)
    "x86_64": dict(fork=57, vfork=58, ptrace=101, syslog=103, pivot_root=155, chroot=161, acct=163, mount=165,
                   umount2=166, swapon=167, swapoff=168, reboot=169, init_module=175, delete_module=176,
                   quotactl=179, kexec_load=246, add_key=248, request_key=249, keyctl=250, unshare=272,
                   perf_event_open=298, name_to_handle_at=303, open_by_handle_at=304, setns=308,
                   process_vm_readv=310, process_vm_writev=311, finit_module=313, kexec_file_load=320, bpf=321,
                   userfaultfd=323, io_uring_setup=425, io_uring_enter=426, io_uring_register=427,
                   open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
                   pidfd_getfd=438, mount_setattr=442),
    "aarch64": dict(umount2=39, mount=40, pivot_root=41, chroot=51, quotactl=60, acct=89, unshare=97,
                    kexec_load=104, init_module=105, delete_module=106, syslog=116, ptrace=117, reboot=142,
                    add_key=217, request_key=218, keyctl=219, swapon=224, swapoff=225, perf_event_open=241,
                    name_to_handle_at=264, open_by_handle_at=265, setns=268, process_vm_readv=270,
                    process_vm_writev=271, finit_module=273, bpf=280, userfaultfd=282, kexec_file_load=294,
                    io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428,
                    move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, pidfd_getfd=438,
                    mount_setattr=442),
}
_CLONE = {"x86_64": 56, "aarch64": 220}
_CLONE3 = 435
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_CLONE_THREAD = 0x00010000
_EPERM, _ENOSYS = 1, 38
# BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h)
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_KILL, _ALLOW, _ERRNO = 0x80000000, 0x7FFF0000, 0x00050000


@functools.lru_cache(maxsize=None)
def seccomp_filter(arch: str | None = None) -> bytes | None:
    """The compiled seccomp program (struct sock_filter[]) for `arch` (default: this machine's), or
    None for an architecture without a table here. Another architecture's syscall is killed;
    x86_64's x32 ABI is refused."""
    arch = arch or platform.machine()
    if arch not in _DENIED:
        return None
    denied = sorted(_DENIED[arch].values())
    prog: list[tuple[int, int, int, int]] = [
        (_LD_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ, 1, 0, _AUDIT_ARCH[arch]),
        (_RET, 0, 0, _KILL),
        (_LD_ABS, 0, 0, 0),  # seccomp_data.nr
    ]
    if arch == "x86_64":
        prog.append((_JGE, 0, 1, 0x40000000))  # x32 syscalls
        prog.append((_RET, 0, 0, _ERRNO | _EPERM))
    prog.append((_JEQ, 0, 1, _CLONE3))
    prog.append((_RET, 0, 0, _ERRNO | _ENOSYS))  # glibc then falls back to clone (below)
    prog.append((_JEQ, 0, 4, _CLONE[arch]))
    prog.append((_LD_ABS, 0, 0, 16))  # low word of args[0]: clone's flags (both ABIs are little-endian here)
    prog.append((_JSET, 1, 0, _CLONE_THREAD))
    prog.append((_RET, 0, 0, _ERRNO | _EPERM))  # a new process
    prog.append((_RET, 0, 0, _ALLOW))  # a thread
    for i, nr in enumerate(denied):  # each jumps to the shared EPERM return after the list
        prog.append((_JEQ, len(denied) - i, 0, nr))
    prog.append((_RET, 0, 0, _ALLOW))
    prog.append((_RET, 0, 0, _ERRNO | _EPERM))
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


# ----------------------------------------------------------------------------- the jail

def _python_dirs() -> list[str]:
    """Directories the interpreter and its packages live in (outside /usr), outermost only."""
    real = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    dirs = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, real)})
    dirs += sorted({p for p in (sys.prefix, sys.base_prefix) if os.path.realpath(p) != p})  # symlinked prefixes
    outer = [d for d in dirs if not any(d != o and d.startswith(o + os.sep) for o in dirs)]
    return [d for d in outer if d != "/usr" and not d.startswith("/usr/")]


def bwrap_argv(limits: Limits, seccomp_fd: int | None) -> list[str]:
    """The bwrap command line (without the program) for one run."""
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
            "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = f"/{top}"
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    if os.path.exists("/etc/ld.so.cache"):
        argv += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    for d in _python_dirs():
        argv += ["--ro-bind", d, d]
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
             "--size", str(limits.disk_mb << 20), "--tmpfs", WORKDIR, "--remount-ro", "/", "--chdir", WORKDIR]
    for key, value in sandbox_env().items():
        argv += ["--setenv", key, value]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv


def sandbox_env() -> dict[str, str]:
    """The whole environment a sandboxed program sees."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


_PROBE = ("import os, posix\nassert os.getuid() == %d, os.getuid()\n"
          "try:\n    posix.fork()\nexcept OSError:\n    pass\nelse:\n    raise SystemExit('fork was not refused')\n"
          "assert not os.access('/etc', os.W_OK)\n" % NOBODY)


@functools.lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why the jail cannot run here (one line), or None when it can: bwrap is on PATH, this
    architecture has a seccomp table, and a probe run inside is nobody and cannot fork."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    if seccomp_filter() is None:
        return f"no seccomp table for this architecture ({platform.machine()})"
    try:
        out = _spawn([sys.executable, "-I", "-c", _PROBE], b"", Limits(wall_s=30), "bwrap", report_fd=None)
    except OSError as err:
        return f"bwrap could not start: {err}"
    if out.exit_code != 0:
        why = out.report.strip().splitlines()[-1:] or [f"exit code {out.exit_code}"]
        return f"bwrap could not set up the sandbox: {why[0]} (user namespaces refused? see README, Security)"
    return None


def run(code: str, stdin: bytes, limits: Limits, isolation: str = "bwrap") -> Finished:
    """Run `python -I -c code` with `stdin`; the program writes its report to the file descriptor
    whose number is `sys.argv[1]` (its stdout and stderr go to /dev/null). Returns when it exits or
    `limits.wall_s` passes (then it and everything it started is killed).
    Raises SandboxUnavailable for `isolation="bwrap"` where the jail cannot be set up."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "bwrap" and (why := unavailable()):
        raise SandboxUnavailable(why)
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-I", "-c", code, str(write_fd)]
    try:
        if isolation == "bwrap":  # the jail brings its own tmpfs working directory
            return _spawn(argv, stdin, limits, isolation, report_fd=(read_fd, write_fd))
        with tempfile.TemporaryDirectory(prefix="raygrpo-code-") as cwd:
            return _spawn(argv, stdin, limits, isolation, report_fd=(read_fd, write_fd), cwd=cwd)
    finally:
        for fd in (read_fd, write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def _spawn(argv: list[str], stdin: bytes, limits: Limits, isolation: str,
           report_fd: tuple[int, int] | None, cwd: str = "/") -> Finished:
    """Start argv (jailed for "bwrap"), feed stdin, collect the report until exit or the wall clock.
    Without `report_fd` the report is the process's stderr (the probe's diagnostics)."""
    pass_fds, seccomp_r = [], None
    if isolation == "bwrap":
        seccomp_r, seccomp_w = os.pipe()
        os.write(seccomp_w, seccomp_filter())  # a few hundred bytes: fits the pipe
        os.close(seccomp_w)
        pass_fds.append(seccomp_r)
        argv = [*bwrap_argv(limits, seccomp_r), "--", *argv]
    if report_fd:
        pass_fds.append(report_fd[1])
    env = {**sandbox_env(), "HOME": cwd, "TMPDIR": cwd} if isolation == "none" else {}
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL if report_fd else subprocess.PIPE, env=env,
                                cwd="/" if isolation == "bwrap" else cwd, pass_fds=pass_fds,
                                start_new_session=True)
    finally:
        if seccomp_r is not None:
            os.close(seccomp_r)
        if report_fd:
            os.close(report_fd[1])
    deadline = time.monotonic() + limits.wall_s
    try:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(stdin)
            proc.stdin.close()
        source = report_fd[0] if report_fd else proc.stderr.fileno()
        report, closed = _read_until(source, deadline)
        timed_out = not closed
        if closed:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            timed_out = proc.poll() is None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # bwrap's pid 1 dies with it, and with it the namespace
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    return Finished(report.decode(errors="replace"), timed_out, None if timed_out else proc.returncode)


def _read_until(fd: int, deadline: float) -> tuple[bytes, bool]:
    """What arrives on `fd` before its writers close it (then True), the deadline or the size cap."""
    data = b""
    while len(data) < MAX_REPORT_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return data, False
        chunk = os.read(fd, 4096)
        if not chunk:
            return data, True
        data += chunk
    return data[:MAX_REPORT_BYTES], False
