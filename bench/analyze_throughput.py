"""Throughput and peak memory of `echolab analyze` on a run of N rollout rows, as verl or echolab writes it.

Writes the run step by step (never whole in memory): `--layout verl` a verl rollout dump (`{step}.jsonl`, steps
from 1, keys input / output / gts / score / step / acc), `--layout parquet` an echolab run directory
(`rollouts/step_NNNNNN.parquet` with gold answers, token counts, logprobs and per-layer expert loads). Each step
holds `--rows-per-step` completions (default 512 prompts x 16 samples, a verl GRPO step), in the three paper
formats rendered by `specialists.formats`: a sixth TinyGSM-style functions and a sixth `<llm-code>` (so a third of
all rows is code the sandbox runs), two thirds natural language, 70% of them correct. Every row is a completion
of its own (a sample number written into it): the worst case for the grader, which grades each distinct
completion once. As rendered, completions are short (30-200 characters); real RL completions are 1-8 KB (the
issue's verl run), mostly reasoning prose: `--completion-kb LOW HIGH` writes each completion at a size drawn
log-uniformly between LOW and HIGH KB, the extra text being worked-reasoning sentences in the format's own place
(prose lines before a natural-language solution, a prose lead-in before the first `<llm-code>` as
OpenMathInstruct-1 writes, comment lines in a function's body), so labels, answers and programs' results stay
those of the rendering. Then analyses the run in a fresh process and reports that process's peak resident memory
(`ru_maxrss`): streaming keeps it bounded by one step's rows, whatever N. Prints one JSON line with `rows`,
`seconds` (the analysis alone, wall clock), `rows_per_s`, `peak_rss_mb`, and `cpu_seconds` (CPU time of the
analysis process and its sandbox workers, imports and the workers' start included: what a loaded machine inflates
far less than the wall clock; split into `cpu_seconds_analysis` and `cpu_seconds_sandbox`, and per row as
`cpu_us_per_row`) with the load average at the end.

    python bench/analyze_throughput.py --rows 1000000 --layout verl
    python bench/analyze_throughput.py --rows 200000 --layout verl --completion-kb 1 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specialists.formats import LLM_CODE, NATURAL_LANGUAGE, PYTHON_FUNCTION  # noqa: E402
from specialists.tasks import ITEMS, NAMES, Problem, Step  # noqa: E402

FORMATS = (PYTHON_FUNCTION, LLM_CODE, NATURAL_LANGUAGE)
FORMAT_SHARES = (1 / 6, 1 / 6, 2 / 3)
SAMPLES = 16
LAYERS, EXPERTS = 2, 8


def random_problems(rng: np.random.Generator, count: int, first_id: int) -> list[Problem]:
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
        number = first_id + index
        problems.append(Problem(f"p{number}", f"Question {number}: what is the result?", float(value),
                                NAMES[number % len(NAMES)], ITEMS[number % len(ITEMS)], int(starts[index]), tuple(steps)))
    return problems


def distinct(text: str, format_index: int, row: int) -> str:
    """The rendering with the row's sample number written into it, so no two rows share a completion."""
    if format_index == 0:  # def simple_math_problem():\n    <body>
        head, body = text.split("\n", 1)
        return f"{head}\n    sample = {row}\n{body}"
    if format_index == 1:  # <llm-code>\n<code>
        return text.replace("<llm-code>\n", f"<llm-code>\nsample = {row}\n", 1)
    return f"Sample {row}.\n{text}"


SENTENCES = (
    "{name} starts with {a} {item}, and {b} more makes {c} {item} in all.",
    "Next we take away {b}, which leaves {name} with {a} {item}.",
    "Adding {a} and {b} gives {c}, so that is the new number of {item}.",
    "Let me check that again: {a} plus {b} is {c}, which matches what we found.",
    "We need to be careful here, because the question asks about {item} and not about {name}'s other things.",
    "So far {name} has {a} {item}; the next step of the problem changes this by {b}.",
)


def reasoning(rng: np.random.Generator, characters: int) -> list[str]:
    """Lines of worked-reasoning prose, about `characters` long in all."""
    most = max(characters, 0) // 40 + 1  # every sentence is longer than 40 characters
    sentences, names, items = (rng.integers(count, size=most) for count in (len(SENTENCES), len(NAMES), len(ITEMS)))
    numbers = rng.integers(1, 1000, size=(most, 2)).tolist()
    lines, size = [], 0
    for sentence, name, item, (a, b) in zip(sentences.tolist(), names.tolist(), items.tolist(), numbers):
        if size >= characters:
            break
        lines.append(SENTENCES[sentence].format(name=NAMES[name], item=ITEMS[item], a=a, b=b, c=a + b))
        size += len(lines[-1]) + 1
    return lines


def lengthened(text: str, format_index: int, characters: int, rng: np.random.Generator) -> str:
    """The completion grown to about `characters` with reasoning where its format has prose (see the module doc)."""
    lines = reasoning(rng, characters - len(text))
    if not lines:
        return text
    if format_index == 0:  # comments in the function's body, after its first line
        head, body = text.split("\n", 1)
        return "\n".join([head, *(f"    # {line}" for line in lines), body])
    return "\n".join([*lines, text])  # before the first <llm-code>, or before a natural-language solution


def step_rows(rng: np.random.Generator, step: int, rows: int, first_row: int,
              completion_kb: tuple[float, float] | None = None) -> dict:
    """One step's completions (rows = prompts x SAMPLES), with their gold answers and formats."""
    prompts = random_problems(rng, rows // SAMPLES, first_row // SAMPLES)
    problem = [prompts[i // SAMPLES] for i in range(rows)]
    chosen = rng.choice(len(FORMATS), size=rows, p=FORMAT_SHARES)
    right = rng.random(rows) < 0.7
    texts = [distinct(FORMATS[f].render(p, "easy" if (first_row + i) % 2 else "hard"), f, first_row + i)
             for i, (p, f) in enumerate(zip(problem, chosen))]
    if completion_kb is not None:
        sizes = 1024 * np.exp(rng.uniform(np.log(completion_kb[0]), np.log(completion_kb[1]), rows))
        texts = [lengthened(text, f, int(size), rng) for text, f, size in zip(texts, chosen, sizes)]
    gold = [p.answer + (0 if ok else 1) for p, ok in zip(problem, right)]
    return {"problem": problem, "format": chosen, "text": texts, "gold": gold, "right": right}


def nested_lists(loads: np.ndarray) -> pa.Array:
    """(rows, layers, experts) integers -> Arrow list<list<int64>> without Python objects."""
    rows, layers, experts = loads.shape
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * layers * experts + 1, experts)), pa.array(loads.ravel()))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * layers + 1, layers)), inner)


def write_run(directory: Path, layout: str, rows: int, rows_per_step: int, seed: int = 0,
              completion_kb: tuple[float, float] | None = None) -> None:
    rng = np.random.default_rng(seed)
    routing = rng.dirichlet(np.ones(EXPERTS), size=len(FORMATS))
    steps = -(-rows // rows_per_step)
    folder = directory / "rollouts" if layout == "parquet" else directory
    folder.mkdir(parents=True)
    if layout == "parquet":
        (directory / "config.json").write_text(json.dumps({"formats": "synthetic", "seed": seed}))
    for index in tqdm(range(steps), desc=f"write {layout} run", unit="step", mininterval=2.0):
        count = min(rows_per_step, rows - index * rows_per_step)
        data = step_rows(rng, index, count, index * rows_per_step, completion_kb)
        if layout == "verl":
            step = index + 1  # verl counts steps from 1
            lines = [json.dumps({"input": f"user\n{p.question}\nassistant\n", "output": text, "gts": str(int(gold)),
                                 "score": float(ok), "step": step, "acc": bool(ok)}, ensure_ascii=False)
                     for p, text, gold, ok in zip(data["problem"], data["text"], data["gold"], data["right"])]
            (folder / f"{step}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            continue
        tokens = np.array([len(text.split()) for text in data["text"]])
        loads = np.stack([rng.multinomial(tokens, routing[data["format"]]) for _ in range(LAYERS)], axis=1)
        pq.write_table(pa.table({
            "step": pa.array(np.full(count, index), pa.int64()),
            "prompt_id": pa.array([p.id for p in data["problem"]]),
            "sample_index": pa.array(np.arange(count) % SAMPLES, pa.int64()),
            "completion": pa.array(data["text"]),
            "answer": pa.array(np.asarray(data["gold"], dtype=np.float64)),
            "num_tokens": pa.array(tokens),
            "logprob": pa.array(-0.5 * tokens.astype(np.float64)),
            "expert_load": nested_lists(loads),
        }), folder / f"step_{index:06d}.parquet")


def analyse_in_this_process(directory: Path) -> None:
    """The child's part: analyse, print rows, seconds and this process's peak RSS."""
    from analysis.summary import analyze

    started = time.perf_counter()
    summary = analyze(directory, formats="synthetic", out_dir=directory.parent / "analysis", progress=False)
    seconds = time.perf_counter() - started
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"rows": summary["rows"], "seconds": seconds, "cpu_seconds_analysis": own.ru_utime + own.ru_stime,
                      "cpu_seconds_sandbox": workers.ru_utime + workers.ru_stime,
                      "peak_rss_mb": own.ru_maxrss / 1024}))  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--layout", choices=("verl", "parquet"), default="verl")
    parser.add_argument("--rows-per-step", type=int, default=512 * SAMPLES)
    parser.add_argument("--completion-kb", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="grow each completion to a size drawn log-uniformly in [LOW, HIGH] KB with reasoning "
                             "prose (real RL completions: 1 8); default: the renderings (30-200 characters)")
    parser.add_argument("--analyse-only", type=Path, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.completion_kb is not None and not 0 < args.completion_kb[0] <= args.completion_kb[1]:
        parser.error(f"--completion-kb needs 0 < LOW <= HIGH, got {args.completion_kb[0]:g} {args.completion_kb[1]:g}")
    if args.analyse_only is not None:
        analyse_in_this_process(args.analyse_only)
        return
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(scratch) / "run"
        write_run(run, args.layout, args.rows, args.rows_per_step, completion_kb=args.completion_kb)
        child = subprocess.run([sys.executable, __file__, "--analyse-only", str(run)], capture_output=True, text=True,
                               check=False)
        if child.returncode != 0:
            sys.exit(child.stderr)
        result = json.loads(child.stdout.strip().splitlines()[-1])
    cpu = result["cpu_seconds_analysis"] + result["cpu_seconds_sandbox"]  # the analysis and its sandbox workers
    print(json.dumps({"rows": result["rows"], "layout": args.layout, "rows_per_step": args.rows_per_step,
                      "completion_kb": args.completion_kb,
                      "seconds": round(result["seconds"], 2), "rows_per_s": round(result["rows"] / result["seconds"]),
                      "peak_rss_mb": round(result["peak_rss_mb"], 1), "cpu_seconds": round(cpu, 1),
                      "cpu_seconds_analysis": round(result["cpu_seconds_analysis"], 1),
                      "cpu_seconds_sandbox": round(result["cpu_seconds_sandbox"], 1),
                      "cpu_us_per_row": round(1e6 * cpu / result["rows"], 1),
                      "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
