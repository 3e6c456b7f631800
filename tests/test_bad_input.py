"""Bad input from a new user fails fast with one line and exit status 2, before Ray starts:
orchestration/preflight.py (presets, output_dir, ray.address), orchestration/models.check_model_config
(model.path), tasks/files.py (data files) and Hydra's own composition errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from orchestration.config import ConfigError
from common.models import check_model_path
from orchestration.preflight import RAY_CONNECT_TIMEOUT_S, check_overrides, check_run, host_port

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = sorted(d.name for d in CONF.iterdir() if d.is_dir())


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("group", GROUPS)
def test_unknown_preset_names_group_value_and_known(group, tmp_path):
    known = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for form in (f"{group}=nope", f"+{group}=nope", f"{group}='nope'", f"{group}={known[0]},nope"):
        with pytest.raises(ConfigError) as info:
            check_overrides([form, f"output_dir={tmp_path}"], str(CONF))
        message = str(info.value)
        assert f"unknown {group} preset 'nope'" in message and f"(known: {', '.join(known)})" in message, form


def test_every_preset_and_non_selections_pass(tmp_path):
    sweeps = [f"{g}={','.join(p.stem for p in sorted((CONF / g).glob('*.yaml')))}" for g in GROUPS]
    check_overrides(sweeps, str(CONF))  # every preset of every group (a sweep does not compose: no run dir)
    check_overrides(["--cfg", "job", "experiment=demo", "data=null", "~data", "~experiment=nope", "model.path=nope",
                     "experiment.nope=1", "+reward.functions={nope: 1.0}", "hydra.job.name=nope"], str(CONF))
    check_overrides(["experiment='smoke'", "model.path=nope", f"output_dir={tmp_path / 'out'}"], str(CONF))
    assert (tmp_path / "out").is_dir()  # the run directory Hydra will make was checked by making it


def test_overrides_that_do_not_compose_are_left_to_hydra(tmp_path):
    check_overrides(["nokey=1", "steps=abc", "model.path=[", f"output_dir={tmp_path}"], str(CONF))


# --------------------------------------------------------------------------- output_dir


def _cfg(output_dir: Path | str, address: str | None = None):
    return OmegaConf.create({"output_dir": str(output_dir), "ray": {"address": address}})


def test_output_dir_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "out"
    with pytest.raises(ConfigError, match=r"^output_dir .*/file/out cannot be written: Not a directory$"):
        check_run(_cfg(bad))
    with pytest.raises(ConfigError, match=r"^output_dir .*/file/out cannot be written"):
        check_overrides([f"output_dir={bad}"], str(CONF))  # Hydra would create it before check_run


def test_output_dir_created_and_left_clean(tmp_path):
    check_run(_cfg(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())


# --------------------------------------------------------------------------- ray.address


@pytest.mark.parametrize("address,expected", [
    ("10.0.0.1:6379", ("10.0.0.1", 6379)), ("ray://head:10001", ("head", 10001)),
    ("[::1]:6379", ("::1", 6379)), ("auto", None), ("local", None), (None, None), ("", None), ("head:abc", None),
])
def test_host_port(address, expected):
    assert host_port(address) == expected


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A loopback port whose accept queue is full: a connect there hangs as one to an unreachable host does."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port, held = server.getsockname()[1], []
    try:
        while len(held) < 16:
            try:
                held.append(socket.create_connection(("127.0.0.1", port), timeout=0.5))
            except TimeoutError:
                yield port
                return
        pytest.skip("this kernel accepts connects beyond a full queue")
    finally:
        for s in held + [server]:
            s.close()


def test_ray_address_refused(tmp_path):
    for address in (f"127.0.0.1:{_closed_port()}", f"ray://127.0.0.1:{_closed_port()}"):
        with pytest.raises(ConfigError, match=rf"^cannot reach the Ray cluster at {address}: Connection refused$"):
            check_run(_cfg(tmp_path, address))


def test_ray_address_timeout(tmp_path, silent_port):
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^cannot reach the Ray cluster at 127\.0\.0\.1:\d+: timed out$"):
        check_run(_cfg(tmp_path, f"127.0.0.1:{silent_port}"))
    assert RAY_CONNECT_TIMEOUT_S - 0.5 < time.monotonic() - start < RAY_CONNECT_TIMEOUT_S + 2


def test_ray_address_reachable_or_left_to_ray(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_run(_cfg(tmp_path, f"127.0.0.1:{server.getsockname()[1]}"))
    for address in ("auto", "local", None):
        check_run(_cfg(tmp_path, address))


# --------------------------------------------------------------------------- model.path


@pytest.mark.parametrize("content,match", [
    (b"{}", "config.json has no model_type"),
    (b'{"foo": 1}', "config.json has no model_type"),
    (b'{"model_type": 3}', "config.json has no model_type"),
    (b"[1, 2]", "config.json has no model_type"),
    (b"not json", r"config.json cannot be read as JSON \(Expecting value"),
    (b'{"model_type": "qwen2",', r"config.json cannot be read as JSON"),
    (b"\xff\xfe\x00", r"config.json cannot be read as JSON"),
    (b'{"model_type": "nope"}', r"model_type 'nope' in config.json is unknown to transformers \d"),
])
def test_model_config_rejected(tmp_path, content, match):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^model path {tmp_path}: {match}") as info:
        check_model_path(str(tmp_path))
    assert "\n" not in str(info.value)


def test_model_config_accepted(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    check_model_path(str(tmp_path))
    check_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")  # a hub id is left to transformers


# --------------------------------------------------------------------------- data files (tasks/files.py)


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.jsonl", r"^data file not found: .*missing\.jsonl$"),
    (lambda d: _write(d / "prose.jsonl", "hello world\nmore prose\n"), r"^no valid row in data file .*not valid JSON"),
    (lambda d: _write(d / "rows.jsonl", '{"q": "1+1"}\n'), r"^no valid row in data file .*missing prompt"),
    (lambda d: _write(d / "notes.txt", "x"), r"^unsupported data file"),
    (lambda d: _write(d / "dir" / "readme.txt", "x").parent, r"^cannot read data file .*dir: FileNotFoundError"),
])
def test_bad_data_file(tmp_path, cache_dir, make, match):
    from tasks.files import DataError, load_file

    with pytest.raises(DataError, match=match) as info:
        load_file(str(make(tmp_path)), "prompt", "answer")
    assert isinstance(info.value, ConfigError) and "\n" not in str(info.value)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the CLI


SAFE = ["dry_run=true", "topology.plan_nodes=[1x0]"]  # input that got through would plan and exit 0: never Ray


def run_cli(cwd: Path, cache: str, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m orchestration SAFE OVERRIDES` in `cwd` (output_dir=<cwd>/out unless given), and its wall time."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "WANDB_API_KEY")}
    env["RAYGRPO_CACHE"] = cache
    if not any(o.startswith("output_dir=") for o in overrides):
        overrides += (f"output_dir={cwd / 'out'}",)
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "orchestration", *SAFE, *overrides],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    return res, time.monotonic() - start


def _model_dir(d: Path) -> Path:
    return _write(d / "model" / "config.json", "{}").parent


CLI_CASES = {  # name: (overrides given the test's directory, what the one line says)
    "preset": (lambda d: ["experiment=nope"], "unknown experiment preset 'nope' (known: demo, demo_lora, r1_cpu, r1_smoke, smoke, tools_cpu)"),
    "output_dir": (lambda d: [f"output_dir={_write(d / 'file', 'x')}/out"], "cannot be written: Not a directory"),
    "model": (lambda d: [f"model.path={_model_dir(d)}"], "config.json has no model_type"),
    "ray_address": (lambda d: [f"ray.address=127.0.0.1:{_closed_port()}"], "cannot reach the Ray cluster at 127.0.0.1:"),
    "data": (lambda d: ["data.train_files=[/nope.jsonl]"], "data file not found: /nope.jsonl"),
    "sft_data": (lambda d: ["stage=sft", "sft.train_files=[/nope.jsonl]"], "data file not found: /nope.jsonl"),
    "pipeline": (lambda d: ["experiment=r1_smoke", "pipeline.stages=[{name: a, stage: sft, set: {learner.lr: 0}}]"],
                 "pipeline stage 'a': learner.lr must be > 0"),
    "env_tool": (lambda d: ["env=calculator", "env.tools=[abacus]"], "env.tools: unknown tool 'abacus'"),
    "env_turns": (lambda d: ["env.max_turns=3"], "env.max_turns > 1 needs a multi-turn env"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_one_line_exit_2(case, tmp_path, cache_dir):
    make, expected = CLI_CASES[case]
    overrides = make(tmp_path)
    res, seconds = run_cli(tmp_path, cache_dir, *overrides)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(lines) == 1 and lines[0].startswith("raygrpo: error: "), res.stderr
    assert expected in lines[0], lines[0]
    assert seconds < 30, f"{case}: {seconds:.1f}s"  # no Ray: today's failures took 40 s or hung
    print(f"{case}: {seconds:.1f}s")


@pytest.mark.parametrize("override,says", [("nokey=1", "Key 'nokey' not in 'Config'"),
                                           ("steps=abc", "Value 'abc' of type 'str' could not be converted to Integer")])
def test_cli_hydra_errors_exit_2(override, says, tmp_path, cache_dir):
    res, _ = run_cli(tmp_path, cache_dir, override)
    assert res.returncode == 2, res.stdout + res.stderr
    assert says in res.stderr and "Traceback" not in res.stderr, res.stderr
