"""RL step time in one process against several: `echolab run CONFIG --processes N` for each N, one after another,
on the same cores (each run's OMP_NUM_THREADS = --threads, which the launcher splits between its N processes).

Reports, per N, the median over the update steps of step_time_s and of its split (sample, score, update, sync)
from the run's metrics.jsonl, and the command's wall time (start-up, pretraining cache look-up, analysis and
report included). The runs share the pretrained base (cached under $ECHOLAB_CACHE, trained by the first run when
missing; not part of the step times). Prints one JSON line.

    python bench/processes_step.py [CONFIG] [--processes 1 2] [--threads 2] [--out DIR]

CONFIG defaults to experiments/configs/smoke.toml (vLLM, 4 prompts x 4 samples per step: 2 prompts per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specialists.run_directory import read_metrics  # noqa: E402
SPLIT = ("step_time_s", "sample_time_s", "score_time_s", "update_time_s", "sync_time_s")


def run(config: Path, processes: int, threads: int, out: Path) -> dict:
    variables = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "experiments.cli", "run", str(config), "--out", str(out), "--quiet",
                    "--overwrite", "--processes", str(processes)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env={**os.environ, **variables, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    lines = read_metrics(out).lines
    updates = [line for line in lines if line["update"]]
    return {"processes": processes, "wall_s": round(wall, 1),
            **{key: round(statistics.median(line[key] for line in updates), 2) for key in SPLIT}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "experiments" / "configs" / "smoke.toml"))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", help="where the run directories go (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch)
        results = [run(Path(args.config).resolve(), n, args.threads, out / f"processes-{n}") for n in args.processes]
    print(json.dumps({"config": args.config, "threads": args.threads, "runs": results}))


if __name__ == "__main__":
    main()
