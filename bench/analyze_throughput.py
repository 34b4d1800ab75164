"""Throughput of `echolab analyze`: rows per second on a run directory of synthetic rollouts.

Writes a run directory (one Parquet file per step, SPEC.md's record with gold answers, token counts,
logprobs and per-layer expert loads) with completions in the three paper formats rendered by
`specialists.formats`: a sixth TinyGSM-style functions and a sixth `<llm-code>` (so a third of all rows is
code that the sandbox runs), two thirds natural language. `--distinct-share` sets how many rows carry a
completion of their own (1.0: every row distinct, the worst case; RL samples repeat themselves more and
more as a policy collapses). Only `analyze` is timed. Prints one JSON line.

    python bench/analyze_throughput.py [--rows 1000000] [--distinct-share 1.0] [--steps 20] [--samples 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.summary import analyze  # noqa: E402
from specialists.formats import LLM_CODE, NATURAL_LANGUAGE, PYTHON_FUNCTION  # noqa: E402
from specialists.tasks import ITEMS, NAMES, Problem, Step  # noqa: E402

FORMATS = (PYTHON_FUNCTION, LLM_CODE, NATURAL_LANGUAGE)
FORMAT_SHARES = (1 / 6, 1 / 6, 2 / 3)
LAYERS, EXPERTS = 2, 8


def random_problems(rng: np.random.Generator, count: int) -> list[Problem]:
    """Problems drawn directly (no dedup against a split): a start value and 1-4 add/sub/mul steps."""
    starts, lengths = rng.integers(1, 1000, count), rng.integers(1, 5, count)
    ops, addends, factors = rng.integers(0, 3, (count, 4)), rng.integers(1, 1000, (count, 4)), rng.integers(2, 4, (count, 4))
    problems = []
    for index in range(count):
        value, steps = int(starts[index]), []
        for position in range(int(lengths[index])):
            op = ("add", "sub", "mul")[ops[index, position]]
            operand = int(factors[index, position] if op == "mul" else addends[index, position])
            value = value + operand if op == "add" else value - operand if op == "sub" else value * operand
            steps.append(Step(op, operand))
        problems.append(Problem(f"p{index}", "", float(value), NAMES[index % len(NAMES)], ITEMS[index % len(ITEMS)],
                                int(starts[index]), tuple(steps)))
    return problems


def nested_lists(loads: np.ndarray) -> pa.Array:
    """(rows, layers, experts) integers -> Arrow list<list<int64>> without Python objects."""
    rows, layers, experts = loads.shape
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * layers * experts + 1, experts)), pa.array(loads.ravel()))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * layers + 1, layers)), inner)


def write_run(directory: Path, rows: int, distinct_share: float, steps: int, samples: int, seed: int = 0) -> dict:
    """Write the run directory; return how many rows are code and how many completions are distinct."""
    rng = np.random.default_rng(seed)
    distinct = max(1, int(rows * distinct_share))
    pool = random_problems(rng, distinct)
    pool_format = rng.choice(len(FORMATS), size=distinct, p=FORMAT_SHARES)
    texts = [FORMATS[f].render(problem, "easy" if index % 2 else "hard")
             for index, (problem, f) in enumerate(zip(pool, pool_format, strict=True))]
    # Row i shows pool entry i (while the pool lasts), then entries again; its gold is the entry's answer
    # for 70% of rows (correct) and a different number otherwise.
    entry = np.arange(rows) % distinct
    gold = np.array([pool[i].answer for i in entry]) + np.where(rng.random(rows) < 0.7, 0, 1)
    tokens = np.array([len(texts[i].split()) for i in entry])
    routing = rng.dirichlet(np.ones(EXPERTS), size=len(FORMATS))
    loads = np.empty((rows, LAYERS, EXPERTS), dtype=np.int64)
    for layer in range(LAYERS):
        loads[:, layer] = rng.multinomial(tokens, routing[pool_format[entry]])
    rows_per_step = rows // steps
    (directory / "rollouts").mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"formats": "synthetic", "seed": seed}))
    for step in range(steps):
        part = slice(step * rows_per_step, rows if step == steps - 1 else (step + 1) * rows_per_step)
        count = part.stop - part.start
        offsets = np.arange(part.start, part.stop)
        table = pa.table({
            "step": pa.array(np.full(count, step), pa.int64()),
            "prompt_id": pa.array([f"q{i // samples}" for i in offsets]),
            "sample_index": pa.array(offsets % samples, pa.int64()),
            "completion": pa.array([texts[i] for i in entry[part]]),
            "answer": pa.array(gold[part]),
            "num_tokens": pa.array(tokens[part]),
            "logprob": pa.array(-0.5 * tokens[part].astype(np.float64)),
            "expert_load": nested_lists(loads[part]),
        })
        pq.write_table(table, directory / "rollouts" / f"step_{step:06d}.parquet")
    is_code = np.array([fmt.code is not None for fmt in FORMATS])[pool_format[entry]]
    return {"code_rows": int(is_code.sum()), "distinct_completions": len(set(texts))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--distinct-share", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        data = write_run(run, args.rows, args.distinct_share, args.steps, args.samples)
        started = time.perf_counter()
        summary = analyze(run, formats=None, progress=False)
        seconds = time.perf_counter() - started
    print(json.dumps({"rows": summary["rows"], **data, "seconds": round(seconds, 2),
                      "rows_per_s": round(summary["rows"] / seconds), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
