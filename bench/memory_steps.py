"""Resident memory of `echolab run` over many RL steps: does it grow with the steps?

Runs the smoke preset (experiments/configs/smoke.toml: tiny MoE, GRPO, vLLM engine) with `--steps` RL steps
in this process, while a thread samples the process's resident set size (VmRSS, /proc/self/status) every
`--interval` seconds and the number of steps recorded so far (lines of metrics.jsonl). Prints one JSON line:

- rss_mb_first_step / rss_mb_last_step: the last sample taken while step 0 / the last step was under way;
- rss_mb_peak: the kernel's high-water mark (VmHWM) at the end, analysis and report included;
- growth_mb_per_step: least-squares slope of the per-step RSS over the second half of the steps (the first
  half holds the allocator's warm-up: optimiser state, caches, the engine's first batches);
- rss_mb_by_step: the per-step RSS every tenth step.

    python bench/memory_steps.py [--steps 50] [--algorithm grpo|ppo|ei] [--engine vllm|hf] [--interval 0.2]

The pretrained base is cached in $ECHOLAB_CACHE as for `echolab run` (pretraining is not measured: it ends
before step 0). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def memory_mb(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def steps_recorded(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


def slope(xs: list[float], ys: list[float]) -> float:
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--algorithm", choices=("grpo", "ppo", "ei"), default="grpo")
    parser.add_argument("--engine", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    args = parser.parse_args()

    from experiments.config import load_experiment_config
    from experiments.pipeline import run_experiment

    smoke = (ROOT / "experiments" / "configs" / "smoke.toml").read_text()
    with tempfile.TemporaryDirectory(prefix="echolab-memory-") as scratch:
        config_path = Path(scratch) / "memory.toml"
        config_path.write_text(smoke.replace("steps = 3", f"steps = {args.steps}")
                               .replace('algorithm = "grpo"', f'algorithm = "{args.algorithm}"')
                               .replace('kind = "vllm"', f'kind = "{args.engine}"'))
        run_dir = Path(scratch) / "run"
        rss_by_step: dict[int, float] = {}  # step under way -> its last RSS sample
        finished = threading.Event()

        def sample() -> None:
            while not finished.wait(args.interval):
                rss_by_step[steps_recorded(run_dir)] = memory_mb("VmRSS")

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run_experiment(load_experiment_config(config_path), run_dir, progress=False)
        finished.set()
        sampler.join()

    per_step = {step: rss for step, rss in rss_by_step.items() if step < args.steps}
    missing = sorted(set(range(args.steps)) - set(per_step))
    later = sorted(step for step in per_step if step >= args.steps // 2)
    print(json.dumps({
        "steps": args.steps, "algorithm": args.algorithm, "engine": args.engine,
        "rss_mb_first_step": round(per_step[0], 1), "rss_mb_last_step": round(per_step[args.steps - 1], 1),
        "rss_mb_peak": round(memory_mb("VmHWM"), 1),
        "growth_mb_per_step": round(slope(later, [per_step[s] for s in later]), 3),
        "rss_mb_by_step": {step: round(rss, 1) for step, rss in sorted(per_step.items()) if step % 10 == 0},
        "steps_without_sample": missing,
    }))


if __name__ == "__main__":
    main()
