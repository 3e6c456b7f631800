"""The code sandbox against the escapes an audit found, each tried as a completion would (CPU, as
whatever user runs the suite: root in CI). Every attack defines `add` only if it worked, so a
sample that scores above 0 has escaped; each must score 0, leave nothing on the host, and the next
benign sample must score normally. Missing isolation fails these tests: nothing here skips."""

from __future__ import annotations

import os
import secrets
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from actors import sandbox
from actors.rewards.code import code_tests, make_code_tests
from orchestration.config import ConfigError, validate

TESTS = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"], "time_limit_s": 3}
BENIGN = "def add(a, b):\n    return a + b"


def attack(body: str) -> str:
    """A completion that runs `body` (which sets `ok = True` when the attack worked) and passes the
    tests only then."""
    return (f"```python\nok = False\ntry:\n{textwrap.indent(body, '    ')}\nexcept Exception:\n    pass\n"
            f"if ok:\n    def add(a, b):\n        return a + b\n```")


def assert_contained(body: str) -> None:
    assert code_tests(attack(body), "", TESTS) == 0.0, "the attack worked"
    assert code_tests(attack("ok = True"), "", TESTS) == pytest.approx(2 / 3), "the harness itself is broken"
    assert code_tests(BENIGN, "", TESTS) == pytest.approx(2 / 3)  # the next sample is fine


def test_the_jail_is_available_here():
    """CI must run the real jail: install bubblewrap (the Makefile does) rather than skip."""
    assert sandbox.unavailable() is None


@pytest.mark.parametrize("path", ["/etc/shadow", "/etc/passwd"])
def test_cannot_read_host_files(path):
    assert_contained(f"ok = len(open({path!r}, 'rb').read()) > 0")


def test_cannot_read_a_file_in_home():
    secret = Path.home() / f".raygrpo-test-secret-{secrets.token_hex(4)}"
    secret.write_text("hunter2")
    try:
        assert_contained(f"ok = 'hunter2' in open({str(secret)!r}).read()")
    finally:
        secret.unlink()


def test_cannot_read_another_process_environment(monkeypatch):
    token = secrets.token_hex(8)
    monkeypatch.setenv("RAYGRPO_SECRET", token)  # the reward actor's own environment, too
    other = subprocess.Popen(["sleep", "30"], env={"WANDB_API_KEY": token})
    try:
        assert_contained(
            "import glob, os\n"
            f"ok = {token!r} in str(os.environ)\n"
            "for p in glob.glob('/proc/*/environ') + glob.glob('/proc/*/task/*/environ'):\n"
            "    try:\n"
            f"        ok = ok or {token!r}.encode() in open(p, 'rb').read()\n"
            "    except OSError:\n"
            "        pass\n"
            f"ok = ok or os.path.exists('/proc/{other.pid}')")
    finally:
        other.kill()
        other.wait()


def test_cannot_write_outside(tmp_path):
    target = tmp_path / "pwned"
    assert_contained(f"open({str(target)!r}, 'w').write('x')\nok = True")
    assert_contained("open('/usr/pwned', 'w').write('x')\nok = True")
    assert not target.exists()


def test_no_network_even_to_localhost():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        accepted = []
        done = threading.Event()

        def accept():
            while not done.is_set():
                try:
                    accepted.append(server.accept())
                except OSError:
                    pass

        t = threading.Thread(target=accept)
        t.start()
        try:
            assert_contained(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nok = True")
            host_ip = socket.gethostbyname(socket.gethostname())
            assert_contained(f"import socket\nsocket.create_connection(({host_ip!r}, {port}), timeout=1)\nok = True")
        finally:
            done.set()
            t.join()
        assert accepted == []


def test_cannot_reach_unix_sockets(tmp_path):
    name = f"raygrpo-test-{secrets.token_hex(4)}"
    path = tmp_path / "sock"
    servers = []
    for address in (str(path), "\0" + name):  # a socket file and an abstract socket
        s = socket.socket(socket.AF_UNIX)
        s.bind(address)
        s.listen()
        s.setblocking(False)
        servers.append(s)
    try:
        for address in (str(path), "\0" + name):
            assert_contained(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({address!r})\nok = True")
        for s in servers:
            with pytest.raises(BlockingIOError):
                s.accept()
    finally:
        for s in servers:
            s.close()


def test_cannot_setns_into_another_network():
    """The audit's sandbox setns-ed into the host's network namespace through /proc/<pid>/ns/net."""
    assert_contained(
        "import ctypes, glob, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for p in glob.glob('/proc/*/ns/net'):\n"
        "    fd = os.open(p, os.O_RDONLY)\n"
        "    ok = ok or libc.setns(fd, 0) == 0\n")


def test_cannot_mount_or_unshare():
    """Bind-mounting over its own directory (so that a cleanup deletes host files), or making a
    user namespace to gain mount rights, is refused."""
    assert_contained("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                     "ok = libc.mount(b'/usr', b'/tmp', None, 4096 | 16384, None) == 0")  # MS_BIND | MS_REC
    assert_contained("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                     "ok = libc.unshare(0x10000000 | 0x00020000) == 0")  # CLONE_NEWUSER | CLONE_NEWNS


def test_cannot_write_into_another_process_pipe():
    """The audit's completion wrote a framed reply into the reward server's pipe via /proc/<pid>/fd."""
    read_fd, write_fd = os.pipe()
    holder = subprocess.Popen(["sleep", "30"], pass_fds=(write_fd,))
    os.close(write_fd)
    try:
        assert_contained(
            "import glob, os\n"
            "for p in glob.glob('/proc/*/fd/*'):\n"
            "    try:\n"
            "        if 'pipe' in os.readlink(p) and not p.startswith('/proc/self'):\n"
            "            fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)\n"
            "            os.write(fd, b'PWNED')\n"
            f"            ok = ok or os.path.exists('/proc/{holder.pid}')\n"
            "    except OSError:\n"
            "        pass\n")
        assert select.select([read_fd], [], [], 0)[0] == []  # nothing arrived
    finally:
        holder.kill()
        holder.wait()
        os.close(read_fd)


def test_disk_flood_is_bounded():
    assert_contained("f = open('big', 'wb')\nfor _ in range(200):\n    f.write(b'x' * (1 << 20))\nf.flush()\nok = True")
    assert_contained("import os\nfor i in range(100):\n    with open('f%d' % i, 'wb') as f:\n"
                     "        f.write(b'x' * (512 << 10))\nok = True")


def test_forks_and_threads():
    """A process cannot start another (so limits per process are limits per sample); threads work."""
    assert_contained("import posix\nok = posix.fork() >= 0")
    assert_contained("import posix\nok = posix.posix_spawn('/bin/true', ['true'], {}) > 0")
    threads = "import threading\nr = []\nt = threading.Thread(target=r.append, args=(1,))\nt.start()\nt.join()\nok = r == [1]"
    assert code_tests(attack(threads), "", TESTS) == pytest.approx(2 / 3)


def test_runs_as_nobody_without_capabilities():
    assert_contained("import os\nok = os.getuid() == 0 or os.geteuid() == 0")
    assert_contained("status = open('/proc/self/status').read()\n"
                     "ok = any(l.split()[1].strip('0') for l in status.splitlines() if l.startswith(('CapEff', 'CapPrm')))")


def test_fail_closed_without_bwrap(monkeypatch, tmp_path):
    """No bwrap: code_tests raises (the sample fails) rather than run unjailed, and a config that
    scores code refuses to start with one line; only sandbox=none runs the code."""
    from tests.test_config import make_cfg

    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    sandbox.unavailable.cache_clear()
    try:
        assert "bubblewrap (bwrap) is not installed" in sandbox.unavailable()
        with pytest.raises(sandbox.SandboxUnavailable):
            code_tests(BENIGN, "", TESTS)
        cfg = make_cfg("eval.reward=code_tests", "reward.timeout_s=15")
        with pytest.raises(ConfigError, match=r"code_tests cannot jail model-written code here: bubblewrap") as info:
            validate(cfg)
        assert "\n" not in str(info.value)
        validate(make_cfg("eval.reward=code_tests", "reward.timeout_s=15", "reward.code.sandbox=none"))
        assert make_code_tests("none")(BENIGN, "", TESTS) == pytest.approx(2 / 3)
    finally:
        sandbox.unavailable.cache_clear()


def test_no_jail_outlives_its_sample():
    """A sample that sleeps past its wall clock is killed with everything in its jail. It names
    itself (its comm) so that jails of other processes on the machine do not count."""
    name = f"rg{secrets.token_hex(6)}"
    sleeper = f"import ctypes, time\nctypes.CDLL(None).prctl(15, {name.encode()!r})\ntime.sleep(60)"
    code_tests(attack(sleeper), "", {**TESTS, "time_limit_s": 1})
    deadline = time.monotonic() + 5  # SIGKILLed with its jail; on a loaded machine its exit may take a moment
    while (alive := [p for p in os.listdir("/proc") if p.isdigit() and _comm(p) == name]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_a_virtualenv_under_tmp_is_reachable(monkeypatch):
    """The working directory is not /tmp: a CI checkout's virtualenv under the host's /tmp is bound
    at its own path, not hidden under the jail's tmpfs."""
    monkeypatch.setattr(sandbox, "_python_dirs", lambda: ["/tmp/ci/.venv", "/opt/python"])
    argv = sandbox.bwrap_argv(sandbox.Limits(), None)
    tmpfs = [argv[i + 1] for i, a in enumerate(argv) if a == "--tmpfs"]
    assert tmpfs == [sandbox.WORKDIR]
    assert not any(d == t or d.startswith(t.rstrip("/") + "/") for d in ("/tmp/ci/.venv", "/opt/python") for t in tmpfs)
    assert ["--ro-bind", "/tmp/ci/.venv", "/tmp/ci/.venv"] == argv[argv.index("/tmp/ci/.venv") - 1:argv.index("/tmp/ci/.venv") + 2]


def test_seccomp_program_shape():
    """One 8-byte instruction each; an architecture without a table gets none (and unavailable)."""
    for arch in ("x86_64", "aarch64"):
        prog = sandbox.seccomp_filter(arch)
        assert prog is not None and len(prog) % 8 == 0 and len(prog) // 8 < 256
    assert sandbox.seccomp_filter("riscv64") is None
    assert sys.platform.startswith("linux")
