"""Pretraining corpora in the shapes of the Echo Chamber paper's real datasets, written from synthetic train problems
(no dataset text is shipped): one JSONL file per format, one {"text": ...} per line, each text echolab's prompt
followed by a solution as that dataset writes it.

- TinyGSM (Liu et al. 2023, arXiv:2312.09241): `def simple_math_problem() -> int:` with the question as its
  docstring, one variable per quantity, `result = ...`, `return result`.
- OpenMathInstruct-1 (Toshniwal et al. 2024, arXiv:2402.10176): an `<llm-code>` block, its
  `<llm-code-output>`, then a sentence with the answer in `\\boxed{}`.
- GSM8K (Cobbe et al. 2021, arXiv:2110.14168): prose steps with `<<a+b=c>>` calculator annotations, then `#### N`.

With `format_set = "echo-chamber"` these are the formats `python_function`, `llm_code` and `gsm8k`.
"""

from __future__ import annotations

import json
from pathlib import Path

from specialists.tasks import OPERATIONS, Problem, TaskSettings, generate_problems, prompt_text

VERBS = {"add": "buys {value} more", "sub": "gives away {value}", "mul": "ends up with {value} times as many"}


def tinygsm(problem: Problem) -> str:
    variable = problem.item
    lines = ["def simple_math_problem() -> int:", '    """', f"    {problem.question}", '    """',
             f"    {variable} = {problem.start}"]
    for step in problem.steps:
        lines.append(f"    {variable} = {variable} {OPERATIONS[step.op][1]} {step.value}")
    lines += [f"    result = {variable}", "    return result"]
    return "\n".join(lines)


def openmathinstruct(problem: Problem) -> str:
    variable = problem.item
    lines = ["<llm-code>", f"{variable} = {problem.start}"]
    for step in problem.steps:
        lines.append(f"{variable} = {variable} {OPERATIONS[step.op][1]} {step.value}")
    lines += [variable, "</llm-code>", "<llm-code-output>", str(int(problem.answer)), "</llm-code-output>",
              f"Thus {problem.name} has \\boxed{{{int(problem.answer)}}} {problem.item}."]
    return "\n".join(lines)


def gsm8k(problem: Problem) -> str:
    values = problem.intermediate_values()
    lines = []
    for step, before, after in zip(problem.steps, values, values[1:]):
        operator = OPERATIONS[step.op][1]
        lines.append(f"{problem.name} {VERBS[step.op].format(value=step.value)}, so {before} {operator} {step.value} = "
                     f"<<{before}{operator}{step.value}={after}>>{after} {problem.item}.")
    lines.append(f"#### {int(problem.answer)}")
    return "\n".join(lines)


WRITERS = {"python_function": tinygsm, "llm_code": openmathinstruct, "gsm8k": gsm8k}


def write_corpora(directory: Path, texts_per_format: int, seed: int = 0, task: TaskSettings = TaskSettings()) -> dict[str, Path]:
    """One JSONL corpus per format of WRITERS, each on its own train problems; returns {format: path}."""
    problems = generate_problems(texts_per_format * len(WRITERS), seed, "train", task)
    paths = {}
    for index, (name, write) in enumerate(WRITERS.items()):
        path = Path(directory) / f"{name}.jsonl"
        own = problems[index * texts_per_format:(index + 1) * texts_per_format]
        path.write_text("".join(json.dumps({"text": prompt_text(p) + write(p)}) + "\n" for p in own))
        paths[name] = path
    return paths
