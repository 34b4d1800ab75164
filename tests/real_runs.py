"""Rollouts of a planned RL run in the real datasets' shapes, written as verl, TRL and echolab write them.

The plan fixes, per step, how many completions of each shape are correct and wrong, so every figure the analysis
must recover (format shares, per-format and overall accuracy, collapse step) is known in advance (`expected`).
Completions are our own texts in each real shape (no dataset text): TinyGSM functions with a docstring and
`-> int`, OpenMathInstruct-1 solutions (prose lead-in, notebook cells with a bare last expression,
`<llm-code-output>`, closing `\\boxed{}`; also several cells without a box), prose ending in "The answer is N",
"The answer is: N" or `\\boxed{N}`, GSM8K's `#### N`, and garbage (no answer, a truncated function, prose with a
code block).

verl (`RayPPOTrainer._dump_generations`): `{global_step}.jsonl`, steps from 1, one `json.dumps(entry,
ensure_ascii=False)` line per sample with input (the chat prompt decoded without special tokens: role words
stay), output, gts, score, step and the reward's extra keys (here `acc`). TRL (`GRPOTrainer.log` with
`log_completions=True`): `completions/completions_{global_step:05d}.parquet` from a pandas DataFrame with step,
prompt and completion as chat-message lists, one column per reward function, and advantage.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from specialists.tasks import OPERATIONS, Problem, generate_problems

SAMPLES = 8
PROMPTS = 4
# step -> {shape: (correct, wrong)}; 32 completions a step. The collapse onto python_function comes at the 4th
# step (30 of 32 = 0.9375 >= 0.9); at the 3rd it is 26 of 32 = 0.8125.
PLAN = [
    {"tinygsm": (6, 2), "openmath_boxed": (3, 1), "openmath_cells": (2, 2), "prose": (3, 3), "gsm8k": (2, 0),
     "garbage": (0, 8)},
    {"tinygsm": (13, 3), "openmath_boxed": (2, 1), "openmath_cells": (1, 1), "prose": (2, 2), "gsm8k": (1, 1),
     "garbage": (0, 5)},
    {"tinygsm": (24, 2), "openmath_boxed": (1, 0), "openmath_cells": (0, 1), "prose": (1, 0), "gsm8k": (0, 1),
     "garbage": (0, 2)},
    {"tinygsm": (29, 1), "openmath_boxed": (1, 0), "openmath_cells": (0, 0), "prose": (0, 1), "gsm8k": (0, 0),
     "garbage": (0, 0)},
]
FORMAT_OF = {"tinygsm": "python_function", "openmath_boxed": "llm_code", "openmath_cells": "llm_code",
             "prose": "natural_language", "gsm8k": "gsm8k", "garbage": "other"}
FORMATS = ["python_function", "llm_code", "gsm8k", "natural_language", "other"]  # the echo-chamber set's order
SYSTEM = "You are a helpful assistant. Solve the problem."


def expected(first_step: int) -> dict:
    """Per step: format shares, per-format accuracy (None where a format is absent), overall accuracy; and the
    collapse step, all worked out from PLAN."""
    shares, accuracy, format_accuracy = {}, {}, {}
    for offset, plan in enumerate(PLAN):
        step = str(first_step + offset)
        counts = {name: 0 for name in FORMATS}
        right = {name: 0 for name in FORMATS}
        for shape, (correct, wrong) in plan.items():
            counts[FORMAT_OF[shape]] += correct + wrong
            right[FORMAT_OF[shape]] += correct
        total = sum(counts.values())
        assert total == PROMPTS * SAMPLES, f"the plan's step {step} has {total} completions"
        shares[step] = {name: counts[name] / total for name in FORMATS}
        format_accuracy[step] = {name: right[name] / counts[name] if counts[name] else None for name in FORMATS}
        accuracy[step] = sum(right.values()) / total
    return {"format_share": shares, "format_accuracy": format_accuracy, "accuracy": accuracy,
            "collapse_step": first_step + 3, "steps": [first_step + offset for offset in range(len(PLAN))]}


def problems() -> list[Problem]:
    return generate_problems(PROMPTS, seed=11, split="train")


def _steps_of(problem: Problem) -> list[tuple[str, str, int]]:
    """(variable, operator, operand) per operation."""
    return [(problem.item, OPERATIONS[step.op][1], step.value) for step in problem.steps]


def completion(shape: str, problem: Problem, correct: bool, variant: int) -> str:
    """One completion of `shape` for `problem`: its final answer is the gold answer when `correct`, else one more."""
    answer = int(problem.answer) + (0 if correct else 1)
    item = problem.item
    if shape == "tinygsm":
        lines = [f"def simple_math_problem() -> int:", '    """', f"    {problem.question}", '    """',
                 f"    {item} = {problem.start}"]
        lines += [f"    {item} = {item} {op} {value}" for _, op, value in _steps_of(problem)]
        lines.append(f"    result = {item}" + ("" if correct else " + 1"))
        lines.append("    return result")
        return "\n".join(lines)
    if shape == "openmath_boxed":  # the box is what counts (the dataset's grading); the code agrees with it
        code = [f"{item} = {problem.start}"] + [f"{item} = {item} {op} {value}" for _, op, value in _steps_of(problem)]
        code.append(item if correct else f"{item} + 1")
        return ("Let's solve this problem using Python code.\n<llm-code>\n" + "\n".join(code) + "\n</llm-code>\n"
                f"<llm-code-output>\n{answer}\n</llm-code-output>\nThus the answer is \\boxed{{{answer}}}.")
    if shape == "openmath_cells":  # no box: the notebook's output counts; the first cell prints, the last is bare
        first = f"start = {problem.start}\nprint(start)"
        rest = [f"{item} = start"] + [f"{item} = {item} {op} {value}" for _, op, value in _steps_of(problem)]
        rest.append(item if correct else f"{item} + 1")
        return (f"First the starting amount.\n<llm-code>\n{first}\n</llm-code>\n<llm-code-output>\n{problem.start}\n"
                "</llm-code-output>\nNow the operations.\n<llm-code>\n" + "\n".join(rest) + "\n</llm-code>\n"
                f"<llm-code-output>\n{answer}\n</llm-code-output>")
    if shape == "prose":
        lines, value = [], problem.start
        for _, op, operand in _steps_of(problem):
            after = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
            lines.append(f"Then {value} {op} {operand} = {after}.")
            value = after
        ending = [f"The answer is {answer}.", f"The answer is: {answer}",
                  f"So {item} end at $\\boxed{{{answer}}}$."][variant % 3]
        return "We definitely need to define each step.\n" + "\n".join(lines) + "\n" + ending
    if shape == "gsm8k":
        return f"It starts with {problem.start} {item}.\nAfter the changes there are {answer} {item}.\n#### {answer}"
    return ["I am not sure how to solve this.",
            f"def simple_math_problem():\n    {item} = {problem.start}\n    {item} = {item} + ",  # cut off
            f"Let me compute.\n```python\nprint({answer})\n```\nThe answer is {answer}."][variant % 3]


def planned_rows(first_step: int, seed: int = 0) -> list[dict]:
    """The run's rows in sampling order: per step, each prompt's SAMPLES completions, shapes shuffled (seeded)."""
    rng = np.random.default_rng(seed)
    pool = problems()
    rows = []
    for offset, plan in enumerate(PLAN):
        items = [(shape, True) for shape, (right, _) in plan.items() for _ in range(right)]
        items += [(shape, False) for shape, (_, wrong) in plan.items() for _ in range(wrong)]
        order = rng.permutation(len(items))
        for position, index in enumerate(order):
            shape, correct = items[index]
            problem = pool[position // SAMPLES]
            rows.append({"step": first_step + offset, "problem": problem, "shape": shape, "correct": correct,
                         "completion": completion(shape, problem, correct, position)})
    return rows


def chat_prompt_as_decoded(problem: Problem) -> str:
    """What verl's `tokenizer.batch_decode(prompts, skip_special_tokens=True)` gives for a ChatML prompt: the
    <|im_start|> / <|im_end|> markers are gone, the role words stay."""
    return f"system\n{SYSTEM}\nuser\n{problem.question}\nassistant\n"


def write_verl_dump(folder: Path, with_gts: bool = True) -> Path:
    folder.mkdir(parents=True)
    rows = planned_rows(first_step=1)
    for step in sorted({row["step"] for row in rows}):
        lines = []
        for row in (row for row in rows if row["step"] == step):
            entry = {"input": chat_prompt_as_decoded(row["problem"]), "output": row["completion"],
                     **({"gts": str(int(row["problem"].answer))} if with_gts else {}),
                     "score": 1.0 if row["correct"] else 0.0, "step": step, "acc": row["correct"]}
            lines.append(json.dumps(entry, ensure_ascii=False))
        (folder / f"{step}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_trl_output(output_dir: Path, repeat_batches: bool = False, answer_column: bool = False) -> Path:
    """A GRPOTrainer output directory; `repeat_batches`: steps_per_generation = 2, so each generation batch is
    logged at two consecutive steps (files 1, 2 hold batch one; our plan's batches land at steps 1, 3, 5, 7)."""
    folder = output_dir / "completions"
    folder.mkdir(parents=True)
    rows = planned_rows(first_step=1)
    for step in sorted({row["step"] for row in rows}):
        batch = [row for row in rows if row["step"] == step]
        table = {
            "prompt": [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["problem"].question}]
                       for row in batch],
            "completion": [[{"role": "assistant", "content": row["completion"]}] for row in batch],
            "accuracy_reward": [1.0 if row["correct"] else 0.0 for row in batch],
            "format_reward": [0.0 if row["shape"] == "garbage" else 1.0 for row in batch],
            **({"answer": [str(int(row["problem"].answer)) for row in batch]} if answer_column else {}),
            "advantage": [0.5 if row["correct"] else -0.5 for row in batch],
        }
        logged_at = [2 * step - 1, 2 * step] if repeat_batches else [step]
        for global_step in logged_at:
            frame = pd.DataFrame({"step": [global_step] * len(batch), **table})
            frame = frame[["step", "prompt", "completion", "accuracy_reward", "format_reward",
                           *(["answer"] if answer_column else []), "advantage"]]
            frame.to_parquet(folder / f"completions_{global_step:05d}.parquet")
    return output_dir


def write_rollout_file(path: Path) -> Path:
    """echolab's rollout record, steps from 0 (the model before any update)."""
    rows = planned_rows(first_step=0)
    records = [{"step": row["step"], "prompt_id": row["problem"].id, "completion": row["completion"],
                "answer": row["problem"].answer} for row in rows]
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path
