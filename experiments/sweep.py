"""Sweeps: a base experiment config and a grid of overrides, run locally or as Ray tasks.

Sweep file (TOML):

    base = "../configs/smoke.toml"        # path relative to the sweep file
    name = "smoke"
    [grid]                                 # dotted config keys -> values; the runs are the product
    seed = [0, 1]
    [variants.baseline]                    # optional named sets of overrides, crossed with the grid
    [variants.entropy]
    "rl.mitigations.entropy_coef" = 0.01
    [ray]                                  # only for --backend ray
    address = ""                           # "" starts a local Ray cluster; "auto" or "ray://host:port" joins one
    num_cpus = 1                           # per run
    num_gpus = 0                           # per run

The sweep file, its base config, every grid and variant key and every run's config (every rule of
experiments.config) are validated before anything is written or started; an error names the file and line
where the key is set (the sweep's grid or variant, else the base config), the key, and the run.
Every run is a separate `echolab run` process (a crash or an out-of-memory kill loses that run only)
with its own config file `OUT/<run name>/../configs/<run name>.toml`. Distinct pretrained bases
are trained once, before the runs start, so parallel runs never race on the pretraining cache.
The sweep ends with `OUT/sweep.json` (each run's status) and one comparison report `OUT/report.html`.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from experiments.config import ExperimentConfig, KeyPath, TomlFile, Where, check_keys, dotted, read_toml, validate
from specialists.config import Strict
from specialists.errors import UserError


class RaySettings(Strict):
    address: str = ""
    num_cpus: float = Field(1, gt=0)
    num_gpus: float = Field(0, ge=0)


class SweepFile(Strict):
    base: str
    name: str = "sweep"
    grid: dict[str, list] = Field(default_factory=dict)
    variants: dict[str, dict] = Field(default_factory=lambda: {"": {}})
    ray: RaySettings = RaySettings()


@dataclass(frozen=True)
class PlannedRun:
    name: str
    config_path: Path
    run_dir: Path


def _nested(dotted: str, value) -> dict:
    """A dotted key as nested tables: ("rl.sampling.temperature", 1.0) -> {"rl": {"sampling": {"temperature": 1.0}}}."""
    for key in reversed(dotted.split(".")):
        value = {key: value}
    return value


def _set_dotted(document: dict, key: str, value, where: Callable[[], str]) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        document = document.setdefault(part, {})
        if not isinstance(document, dict):
            raise UserError(f"{where()}: key {key!r}: {part!r} is not a section")
    document[leaf] = value


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise UserError(f"cannot write {value!r} to TOML")


def to_toml(document: dict, prefix: str = "") -> str:
    """A minimal TOML writer for config documents (scalars, lists, nested tables)."""
    scalars = [f"{key} = {_toml_value(value)}" for key, value in document.items() if not isinstance(value, dict)]
    tables = [to_toml(value, f"{prefix}{key}.") for key, value in document.items() if isinstance(value, dict)]
    header = f"[{prefix.rstrip('.')}]\n" if prefix and scalars else ""
    return header + "".join(line + "\n" for line in scalars) + "".join(tables)


def plan(sweep_path: str | Path, out_dir: str | Path) -> tuple[SweepFile, list[PlannedRun]]:
    """Validate the sweep and every run's config, then write the run configs: a bad key or value fails
    before anything is written, naming the file and line where it is set (the sweep's grid or variant, or the
    base config), the key and, for a run's config, the run."""
    sweep_path, out_dir = Path(sweep_path), Path(out_dir).resolve()  # Ray workers run elsewhere
    file = read_toml(sweep_path)
    sweep = validate(file.document, SweepFile, file.where)
    if not sweep.variants:
        raise UserError(f"{file.where([('variants',)])}: [variants] needs at least one variant")
    for key, values in sweep.grid.items():
        if not values:
            raise UserError(f"{file.where([('grid', key)])}: grid key {key!r} needs at least one value")
        check_keys(_nested(key, None), ExperimentConfig, lambda _, key=key: f"{file.where([('grid', key)])}: grid")
    for variant, overrides in sweep.variants.items():
        for key in overrides:
            check_keys(_nested(key, None), ExperimentConfig,
                       lambda _, path=("variants", variant, key): f"{file.where([path])}: {dotted(path[:2])}")
    base_path = (sweep_path.parent / sweep.base).resolve()
    if not base_path.is_file():
        raise UserError(f"{file.where([('base',)])}: base {sweep.base!r}: no config file at {base_path} "
                        "(a relative base starts from the sweep file's folder)")
    base = read_toml(base_path)
    validate(base.document, ExperimentConfig, base.where)  # so that the base's own errors name the base file
    keys = list(sweep.grid)
    runs, texts = [], []
    for variant, values in itertools.product(sweep.variants, itertools.product(*(sweep.grid[k] for k in keys))):
        document = json.loads(json.dumps(base.document))
        overrides = {key: ("variants", variant, key) for key in sweep.variants[variant]}
        overrides.update({key: ("grid", key) for key in keys})
        for key, value in [*sweep.variants[variant].items(), *zip(keys, values)]:
            _set_dotted(document, key, value, lambda key=key: file.where([overrides[key]]))
        parts = [variant] if variant else []
        name = "-".join(parts + [f"{key.split('.')[-1]}={value}" for key, value in zip(keys, values)]) or "base"
        document["name"] = f"{sweep.name}/{name}"
        validate(document, ExperimentConfig, _run_where(file, base, overrides, name))
        runs.append(PlannedRun(name, out_dir / "configs" / f"{name}.toml", out_dir / "runs" / name))
        texts.append(to_toml(document))
    for run, text in zip(runs, texts):
        run.config_path.parent.mkdir(parents=True, exist_ok=True)
        run.config_path.write_text(text)
    return sweep, runs


def _run_where(sweep: TomlFile, base: TomlFile, overrides: dict[str, KeyPath], run: str) -> Where:
    """Where a key of one run's config is set: the sweep file's line of the grid or variant key that sets it (or
    a section holding it), else the base config's line; the run is named too."""
    def where(keys):
        for key in keys:
            for override, path in overrides.items():
                if dotted(key) == override or dotted(key).startswith(override + "."):
                    return f"{sweep.where([path])} (run {run})"
            if base.line_of(key) is not None:
                return f"{base.where([key])} (run {run} of {sweep.path})"
        return f"{sweep.path} run {run}"

    return where


def run_one(config_path: str, run_dir: str, resume: bool) -> dict:
    """One run in its own process; returns its status (never raises, so one failure loses one run).
    With `resume`, a finished run (its report.html, written last, exists) is kept as it is, one that has
    started is resumed and one that has not is started."""
    command = [sys.executable, "-m", "experiments.cli", "run", config_path, "--out", run_dir, "--quiet"]
    directory = Path(run_dir)
    if resume and (directory / "report.html").is_file():
        return {"run_dir": run_dir, "status": "ok", "error": ""}
    if resume and directory.is_dir() and any(directory.iterdir()):
        command.append("--resume")
    result = subprocess.run(command, capture_output=True, text=True)
    status = "ok" if result.returncode == 0 else "failed"
    last_error = result.stderr.strip().splitlines()[-1] if result.returncode and result.stderr.strip() else ""
    return {"run_dir": run_dir, "status": status, "error": last_error}


def _pretrain_bases(runs: list[PlannedRun], progress: bool) -> None:
    from experiments.config import load_experiment_config
    from experiments.pipeline import base_model_dir

    distinct = {}
    for run in runs:
        specialists = load_experiment_config(run.config_path).specialists()
        if specialists.model.path is None:  # a model.path base is not pretrained
            distinct[specialists.model_dump_json()] = specialists
    for config in distinct.values():
        base_model_dir(config, progress=progress)


def run_sweep(sweep_path: str | Path, out_dir: str | Path, backend: str = "local", resume: bool = False,
              progress: bool = True) -> Path:
    from tqdm.auto import tqdm

    sweep, runs = plan(sweep_path, out_dir)
    _pretrain_bases(runs, progress)
    if backend == "local":
        results = [run_one(str(r.config_path), str(r.run_dir), resume) for r in tqdm(runs, desc="runs", disable=not progress)]
    elif backend == "ray":
        import ray

        ray.init(address=sweep.ray.address or None, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        task = ray.remote(num_cpus=sweep.ray.num_cpus, num_gpus=sweep.ray.num_gpus, max_retries=0)(run_one)
        pending = {task.remote(str(r.config_path), str(r.run_dir), resume): r for r in runs}
        results = []
        with tqdm(total=len(runs), desc="runs", disable=not progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for reference in done:
                    pending.pop(reference)
                    results.append(ray.get(reference))
                    bar.update(1)
    else:
        raise UserError(f"unknown backend {backend!r}; allowed: local, ray")
    results.sort(key=lambda r: r["run_dir"])
    out_dir = Path(out_dir)
    (out_dir / "sweep.json").write_text(json.dumps({"name": sweep.name, "runs": results}, indent=2) + "\n")
    finished = [Path(r["run_dir"]) for r in results if r["status"] == "ok"]
    if not finished:
        raise UserError(f"every run of the sweep failed; see {out_dir / 'sweep.json'}")
    from analysis.report import write_report

    return write_report(finished, out_dir / "report.html")
