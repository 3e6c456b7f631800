"""Stage `pipeline`: the stages of `pipeline.stages` in turn, on one Ray session — the whole
DeepSeek-R1 recipe as one command (`experiment=r1_cpu`: cold-start SFT → GRPO → rejection
sampling → distillation, each evaluated).

Each stage is the pipeline's own config with the stage's `set` on top, runs in
`<output_dir>/<name>/` and hands the next stages plain files: a setting `stage:<name>` becomes
that stage's policy directory (`policy/`) or, for rejection sampling, its `data.jsonl`. Every
stage's config is built and validated before the first one starts. A finished stage leaves
`DONE.json` (its settings, outputs, wall time) and is not run again when the pipeline is started
again; a GRPO stage that was stopped continues from its newest checkpoint. With
`pipeline.evaluate`, the starting model and every policy are evaluated on the held-out set with
the pipeline's `eval.*`, and `<output_dir>/report.md` holds one table of them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestration import stages
from orchestration.config import Config, ConfigError, validate
from orchestration.config.recipe import STAGE_REF, refs_in
from orchestration.config.stages import STAGES

log = logging.getLogger("raygrpo")
COLUMNS = ("eval/accuracy", "eval/format_rate", "eval/tool_call_rate", "eval/well_formed_rate",
           "eval/response_length")


def resolve_refs(value: Any, outputs: dict[str, Path]) -> Any:
    """`value` with every `stage:<name>` (alone or in a list) replaced by that stage's output."""
    if isinstance(value, str) and value.startswith(STAGE_REF):
        return str(outputs[value[len(STAGE_REF):]])
    if isinstance(value, (list, tuple)):
        return [resolve_refs(v, outputs) for v in value]
    return value


def stage_configs(base: DictConfig) -> list[tuple[str, DictConfig]]:
    """(name, config) of every stage, with evaluations when `pipeline.evaluate`; each validated."""
    out = Path(base.output_dir)
    plain = OmegaConf.to_container(base, resolve=True)
    plain["pipeline"] = {"stages": [], "evaluate": False}
    outputs: dict[str, Path] = {}
    result = []
    evaluate = base.pipeline.evaluate
    if evaluate:
        result.append(("start", _config(plain, "start", "eval", out / "start", {})))
    kinds = {s.name: s.stage for s in base.pipeline.stages}
    for spec in base.pipeline.stages:
        bad = [r for v in spec.set.values() for r in refs_in(v) if r in kinds and STAGES[kinds[r]].output is None]
        if bad:
            raise ConfigError(f"pipeline stage {spec.name!r} refers to {STAGE_REF}{bad[0]}, an "
                              f"{kinds[bad[0]]} stage (no output)")
        settings = {k: resolve_refs(OmegaConf.to_object(v) if OmegaConf.is_config(v) else v, outputs)
                    for k, v in spec.set.items()}
        result.append((spec.name, _config(plain, spec.name, spec.stage, out / spec.name, settings)))
        stage = STAGES[spec.stage]
        if stage.output:  # what `stage:<name>` becomes in the stages after it
            outputs[spec.name] = out / spec.name / stage.output
        if evaluate and stage.trains:
            name = f"{spec.name}/eval"
            result.append((name, _config(plain, name, "eval", out / name, {"model.path": str(outputs[spec.name])})))
    for name, cfg in result:
        _validate(name, cfg, base)
    return result


def _config(plain: dict, name: str, stage: str, out: Path, settings: dict[str, Any]) -> DictConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(Config), plain)
    cfg.stage, cfg.output_dir = stage, str(out)
    cfg.experiment = f"{plain['experiment']}/{name}"
    for key, value in settings.items():
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise ConfigError(f"pipeline stage {name!r}: cannot set {key}={value!r}: "
                              f"{str(err).splitlines()[0]}") from None
    if stage == "train":  # a stopped GRPO stage continues where it stopped
        cfg.resume = "auto" if any((out / "checkpoints").glob("step_*")) else "never"
    return cfg


def _validate(name: str, cfg: DictConfig, base: DictConfig) -> None:
    """Validate a stage's config; a policy an earlier stage will write stands in for itself."""
    check = cfg.copy()
    if not Path(check.model.path).exists() and str(Path(check.model.path)).startswith(str(Path(base.output_dir))):
        check.model.path = base.model.path
    try:
        validate(check)
    except ConfigError as err:
        raise ConfigError(f"pipeline stage {name!r}: {err}") from None


def run(base: DictConfig) -> list[dict[str, Any]]:
    """Run every unfinished stage (Ray started once, and only when one is left); write and print
    the evaluation table."""
    import ray

    from orchestration.cluster import placement

    configs = stage_configs(base)
    n = len(configs)
    if base.dry_run:  # the plan: each stage, what it starts from, where it writes
        for i, (name, cfg) in enumerate(configs, 1):
            state = "finished" if _done(cfg).is_file() else "to run"
            print(f"[{i}/{n}] {name:<16} {cfg.stage:<18} {cfg.model.path} -> {cfg.output_dir} ({state})")
        return []
    Path(base.output_dir).mkdir(parents=True, exist_ok=True)
    for i, (name, cfg) in enumerate(configs, 1):
        if _done(cfg).is_file():
            print(f"pipeline [{i}/{n}] {name}: finished earlier ({_done(cfg)}); skipped", flush=True)
    left = [(i, name, cfg) for i, (name, cfg) in enumerate(configs, 1) if not _done(cfg).is_file()]
    if left:
        placement.start_ray(base)
        try:
            for i, name, cfg in left:
                print(f"pipeline [{i}/{n}] {name} ({cfg.stage}) -> {cfg.output_dir}", flush=True)
                run_stage(name, cfg)
        finally:
            ray.shutdown()
    rows = summary(configs)
    write_report(Path(base.output_dir), base, rows)
    return rows


def _done(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) / "DONE.json"


def run_stage(name: str, cfg: DictConfig) -> None:
    """One stage (Ray is up); `DONE.json` records its settings, outputs and wall time."""
    start = time.time()
    try:
        outcome = stages.run(cfg, stages.prepare(cfg))
    except ConfigError as err:
        raise ConfigError(f"pipeline stage {name!r}: {err}") from None
    record = {"stage": cfg.stage, "policy": _str(outcome.policy), "data": _str(outcome.data),
              "metrics": outcome.metrics, "wall_s": time.time() - start,
              "config": OmegaConf.to_container(cfg, resolve=True)}
    _done(cfg).write_text(json.dumps(record, indent=1, default=str))


def _str(path: Path | None) -> str | None:
    return str(path) if path else None


def summary(configs: list[tuple[str, DictConfig]]) -> list[dict[str, Any]]:
    """One row per evaluation: the policy it judged and its metrics; with each stage's wall time."""
    rows = []
    for name, cfg in configs:
        record = json.loads((Path(cfg.output_dir) / "DONE.json").read_text())
        rows.append({"name": name, "stage": record["stage"], "wall_s": record["wall_s"],
                     "metrics": record["metrics"] or {}})
    return rows


def write_report(out: Path, base: DictConfig, rows: list[dict[str, Any]]) -> Path:
    """`report.md` (the table of evaluations, the stages' wall times) and `pipeline.json`; printed too."""
    evals = [r for r in rows if r["stage"] == "eval"]
    keys = [k for k in COLUMNS if any(k in r["metrics"] for r in evals)]
    keys += sorted({k for r in evals for k in r["metrics"] if k.startswith("eval/pass@")})
    header = ["policy"] + [k.removeprefix("eval/") for k in keys]
    table = [[r["name"].removesuffix("/eval")] + [f"{r['metrics'].get(k, float('nan')):.3f}" for k in keys]
             for r in evals]
    lines = [f"# raygrpo pipeline: {base.experiment}", "", f"Model `{base.model.path}`; stages in order, each "
             f"in its own directory. Total wall time {sum(r['wall_s'] for r in rows) / 60:.1f} min.", "",
             "## Held-out evaluation of each stage's policy", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in table]
    lines += ["", "## Stages", "", "| stage | kind | wall time (s) |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['stage']} | {r['wall_s']:.0f} |" for r in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "pipeline.json").write_text(json.dumps(rows, indent=1))
    _print_table(header, table, out)
    return out / "report.md"


def _print_table(header: list[str], table: list[list[str]], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="held-out evaluation by stage")
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in table:
        t.add_row(*row)
    console = Console()
    console.print(t)
    console.print(f"  report  {out / 'report.md'}")
