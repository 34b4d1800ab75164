"""Sandbox throughput on short TinyGSM-style programs: prints one JSON line.

    python -m bench.sandbox_throughput [--programs N] [--workers W] [--modules math,fractions]

The analysis benchmark runs ~330,000 such programs and must finish well under 60 s on 2 cores, so
the target is >= 10,000 programs/s with 2 workers. The timing covers starting and stopping the pool
(`start_s` is the start alone: the workers load the allowed modules, sympy and numpy by default,
before the OS layer closes). `worker_cpu_us_per_program` is the workers' CPU time (start-up included)
per program, which a loaded machine changes far less than the wall-clock figures. Every program is
distinct (no help from deduplication) and every answer is checked. The output says whether the OS
layer was complete; a run of this file from a checkout before the OS layer gives the "before" figure
(BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from specialists.sandbox import DEFAULT_MODULES, Program, Sandbox


def programs(count: int) -> tuple[list[Program], list[str]]:
    """`count` distinct programs and their expected answers."""
    sources, answers = [], []
    for index in range(count):
        start, added = 3 + index % 997, 1 + index // 997
        sources.append(
            f"def simple_math_problem():\n    apples = {start}\n    apples = apples + {added}\n    return apples"
        )
        answers.append(str(start + added))
    return [Program(source, call="simple_math_problem") for source in sources], answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modules", default=",".join(DEFAULT_MODULES),
                        help="comma-separated modules programs may import (default: the sandbox's allowlist)")
    args = parser.parse_args()
    batch, answers = programs(args.programs)
    started = time.perf_counter()
    with Sandbox(workers=args.workers, modules=tuple(filter(None, args.modules.split(",")))) as sandbox:
        start_s = time.perf_counter() - started
        results = sandbox.run(batch)
        isolation = sandbox.isolation
    seconds = time.perf_counter() - started
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool is closed: its workers were waited for
    wrong = sum(result.value != answer for result, answer in zip(results, answers))
    if wrong:
        print(f"{wrong} of {len(batch)} programs gave a wrong answer", file=sys.stderr)
        return 1
    print(json.dumps({
        "programs": len(batch), "seconds": round(seconds, 3), "programs_per_s": round(len(batch) / seconds),
        "worker_cpu_us_per_program": round(1e6 * (workers.ru_utime + workers.ru_stime) / len(batch), 1),
        "start_s": round(start_s, 3), "os_layer_complete": isolation.complete, "modules": len(isolation.modules),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
