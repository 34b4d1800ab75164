"""Sandbox throughput on short TinyGSM-style programs: prints one JSON line.

    python -m bench.sandbox_throughput [--programs N] [--workers W]

The analysis benchmark runs ~330,000 such programs and must finish well under 60 s on 2 cores, so
the target is >= 10,000 programs/s with 2 workers. The timing covers starting and stopping the pool.
Every program is distinct (no help from deduplication) and every answer is checked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from specialists.sandbox import Program, Sandbox


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
    args = parser.parse_args()
    batch, answers = programs(args.programs)
    started = time.perf_counter()
    with Sandbox(workers=args.workers) as sandbox:
        results = sandbox.run(batch)
    seconds = time.perf_counter() - started
    wrong = sum(result.value != answer for result, answer in zip(results, answers))
    if wrong:
        print(f"{wrong} of {len(batch)} programs gave a wrong answer", file=sys.stderr)
        return 1
    print(json.dumps({"programs": len(batch), "seconds": round(seconds, 3), "programs_per_s": round(len(batch) / seconds)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
