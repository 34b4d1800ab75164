"""Math word problems: a seeded procedural generator and a GSM8K-style JSONL loader.

A synthetic problem is a start quantity followed by a chain of operations on it
("Mia has 7 apples. Mia buys 5 more. ..."). Difficulty is the number of operations
and the range of the numbers. Train and evaluation sets are disjoint by construction:
every problem hashes to a bucket, and the evaluation split owns a fixed share of the buckets.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path

from specialists.errors import UserError

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Ben")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "eggs")

# Operation name -> (sentence template, Python operator). One sentence per operation keeps
# the question <-> solution mapping learnable by a tiny model.
OPERATIONS = {
    "add": ("{name} buys {value} more.", "+"),
    "sub": ("{name} gives away {value}.", "-"),
    "mul": ("{name} ends up with {value} times as many.", "*"),
}


@dataclass(frozen=True)
class Step:
    op: str  # a key of OPERATIONS
    value: int


@dataclass(frozen=True)
class Problem:
    """One problem. `answer` is the gold final number; `start`/`steps` exist for synthetic problems."""

    id: str
    question: str
    answer: float
    name: str = ""
    item: str = ""
    start: int = 0
    steps: tuple[Step, ...] = ()
    reference_solution: str = ""  # GSM8K's worked solution, when loaded from a file

    def intermediate_values(self) -> list[int]:
        """Value after each step: [start, after step 1, ..., final]."""
        values = [self.start]
        for step in self.steps:
            values.append(apply(values[-1], step))
        return values


def apply(value: int, step: Step) -> int:
    if step.op == "add":
        return value + step.value
    if step.op == "sub":
        return value - step.value
    if step.op == "mul":
        return value * step.value
    raise ValueError(f"unknown operation {step.op!r}; allowed: {sorted(OPERATIONS)}")


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty of the synthetic task. Negative intermediate values are never generated."""

    min_operations: int = 1
    max_operations: int = 2
    max_value: int = 20  # start and add/sub operands are drawn from [1, max_value]
    max_multiplier: int = 3  # mul operands are drawn from [2, max_multiplier]
    operations: tuple[str, ...] = ("add", "sub", "mul")

    def __post_init__(self) -> None:
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"unknown operations {sorted(unknown)}; allowed: {sorted(OPERATIONS)}")
        if not 1 <= self.min_operations <= self.max_operations:
            raise ValueError("need 1 <= min_operations <= max_operations")
        if self.max_value < 2 or self.max_multiplier < 2:
            raise ValueError("max_value and max_multiplier must be >= 2")


PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"


def prompt_text(problem: Problem, template: str = PROMPT_TEMPLATE) -> str:
    """The problem through a format string over its fields. The built-in template gives no format
    instruction: which format to use is the model's own choice. (specialists.prompting.Prompter adds a
    tokenizer's special tokens and chat template.)"""
    return template.format(**{field.name: getattr(problem, field.name) for field in fields(problem)})


EVAL_BUCKET_SHARE = 0.2  # a fifth of all possible problems belong to evaluation splits


def _is_eval_problem(question: str) -> bool:
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < EVAL_BUCKET_SHARE


def _random_problem(rng: random.Random, config: TaskConfig) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(1, config.max_value)
    steps, value = [], start
    for _ in range(rng.randint(config.min_operations, config.max_operations)):
        op = rng.choice(config.operations)
        if op == "mul":
            operand = rng.randint(2, config.max_multiplier)
        elif op == "sub":
            if value < 2:
                op, operand = "add", rng.randint(1, config.max_value)
            else:
                operand = rng.randint(1, min(value - 1, config.max_value))
        else:
            operand = rng.randint(1, config.max_value)
        step = Step(op, operand)
        value = apply(value, step)
        steps.append(step)
    sentences = [f"{name} has {start} {item}."]
    sentences += [OPERATIONS[s.op][0].format(name=name, value=s.value) for s in steps]
    sentences.append(f"How many {item} does {name} have now?")
    question = " ".join(sentences)
    problem_id = hashlib.sha256(question.encode()).hexdigest()[:12]
    return Problem(problem_id, question, float(value), name, item, start, tuple(steps))


def generate_problems(count: int, seed: int, split: str, config: TaskConfig = TaskConfig()) -> list[Problem]:
    """`count` distinct problems of `split` ("train" or "eval"), the same for the same seed and config.

    Raises ValueError when the configuration's problem space cannot supply `count` distinct problems.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; allowed: train, eval")
    rng = random.Random(f"{seed}:{split}")
    problems: dict[str, Problem] = {}
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise UserError(f"could only draw {len(problems)} distinct {split} problems of {count}; widen the task config")
        problem = _random_problem(rng, config)
        if _is_eval_problem(problem.question) == (split == "eval"):
            problems.setdefault(problem.question, problem)
    return list(problems.values())


def easy_train_hard_eval(train_count: int, eval_count: int, seed: int,
                         easy: TaskConfig = TaskConfig(1, 2), hard: TaskConfig = TaskConfig(3, 4)) -> tuple[list[Problem], list[Problem]]:
    """The paper's transfer split: train on short chains, evaluate on longer ones (disjoint by length and bucket)."""
    if hard.min_operations <= easy.max_operations:
        raise ValueError("hard problems must have more operations than easy ones")
    return generate_problems(train_count, seed, "train", easy), generate_problems(eval_count, seed, "eval", hard)


# ---------------------------------------------------------------- GSM8K-style JSONL

_GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def parse_number(text: str) -> float:
    """'1,234' -> 1234.0; '$5' is not accepted (strip units before)."""
    return float(text.replace(",", ""))


def load_gsm8k(path: str | Path, limit: int | None = None) -> list[Problem]:
    """Read GSM8K-style JSONL ({"question", "answer"}, answer ending in `#### N`; the Socratic variant too).

    Raises FileNotFoundError for a missing file and ValueError naming the first bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GSM8K file not found: {path}")
    problems = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question, solution = record["question"], record["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise UserError(f"{path}:{line_number}: not a GSM8K record ({error})") from None
            match = _GSM8K_ANSWER.search(solution.strip())
            if match is None:
                raise UserError(f"{path}:{line_number}: answer does not end in '#### N'")
            problem_id = f"{path.stem}-{line_number - 1}"
            problems.append(Problem(problem_id, question, parse_number(match.group(1)), reference_solution=solution))
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise UserError(f"{path}: no problems in file")
    return problems


BUNDLED_GSM8K_EXCERPT = Path(__file__).parent / "data" / "gsm8k_excerpt.jsonl"
