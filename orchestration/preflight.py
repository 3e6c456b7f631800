"""Checks of what a run will touch, before Ray or any actor starts.

`check_overrides` looks at the command line before Hydra composes it: a preset that does not exist
(`experiment=nope`) and a run directory Hydra could not create. `check_run` looks at the composed
config: the output directory and the Ray cluster to join. Each raises ConfigError with one line.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

from orchestration.config import ConfigError, register_configs

RAY_CONNECT_TIMEOUT_S = 3.0


def check_overrides(argv: list[str], conf_dir: str) -> None:
    """Raise ConfigError for a command-line override that selects a preset missing from `conf_dir`
    (`experiment=nope`), or for a run directory (`output_dir`) that cannot be written: Hydra creates
    it before the job, and so before `check_run`, starts. Malformed overrides are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    groups = {d.name: d for d in Path(conf_dir).iterdir() if d.is_dir()}
    for arg in overrides_in(argv):
        try:
            override = parser.parse_override(arg)
        except HydraException:  # a syntax error: Hydra reports it
            continue
        group = groups.get(override.key_or_group)
        if group is not None and not override.is_delete():
            check_presets(group, selected(override))
    if not any(arg.startswith("-") for arg in argv):  # --help, --cfg, -m ...: Hydra makes no run directory
        run_dir = hydra_run_dir(argv, conf_dir)
        if run_dir is not None:
            check_writable(run_dir)


def overrides_in(argv: list[str]) -> list[str]:
    """The `key=value` overrides of a command line: not Hydra's flags (`--cfg job`), nor `~key`
    deletions without a value (they select nothing)."""
    return [arg for arg in argv if "=" in arg and not arg.startswith("-")]


def selected(override: Any) -> list[str]:
    """The preset names a group override selects (several for a sweep or a list; none for null)."""
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    value = override.value()
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def check_presets(group: Path, names: list[str]) -> None:
    """Raise ConfigError unless every name is a preset file `<group>/<name>.yaml`."""
    known = sorted(p.stem for p in group.glob("*.yaml"))
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown {group.name} preset {name!r} (known: {', '.join(known)})")


def hydra_run_dir(argv: list[str], conf_dir: str) -> Optional[str]:
    """The directory Hydra will create for these overrides (`hydra.run.dir`: `${output_dir}` in
    conf/config.yaml), or None when they do not compose (Hydra reports why)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    try:
        with initialize_config_dir(config_dir=conf_dir, version_base=None):
            cfg = compose(config_name="config", overrides=argv, return_hydra_config=True)
        return str(cfg.hydra.run.dir)
    except Exception:  # unknown key, wrong type, bad syntax: Hydra's message, when it composes
        return None


def check_run(cfg: Any) -> None:
    """Raise ConfigError for an output_dir that cannot be written or a Ray address that cannot be reached."""
    check_writable(str(cfg.output_dir))
    check_ray_address(cfg.ray.address)


def check_writable(path: str) -> None:
    """Raise ConfigError unless output directory `path` can be created (if missing) and a file written in it."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".raygrpo-probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"output_dir {path} cannot be written: {e.strerror or e}") from None


def check_ray_address(address: Optional[str]) -> None:
    """Raise ConfigError when an explicit `host:port` or `ray://host:port` address does not accept a
    TCP connection within RAY_CONNECT_TIMEOUT_S. `auto`, `local` and None are left to Ray."""
    target = host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def host_port(address: Optional[str]) -> Optional[tuple[str, int]]:
    """(host, port) of `host:port` or `ray://host:port`; None for anything without a port."""
    if not address:
        return None
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:  # not a number: Ray's to report
        return None
    return (parts.hostname, port) if parts.hostname and port else None
