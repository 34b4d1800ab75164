"""Math word problems: a seeded procedural generator (prompt files are read by specialists.prompt_data).

A synthetic problem is a start quantity followed by a chain of operations on it
("Mia has 7 apples. Mia buys 5 more. ..."). Difficulty is the number of operations
and the range of the numbers. Train and evaluation sets are disjoint by construction:
every problem hashes to a bucket, and the evaluation split owns a fixed share of the buckets.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specialists.errors import SettingsError, UserError

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
    """One problem. `answer` is the gold final answer: a number, or text for a MATH-style answer that is no
    plain number ('\\frac{1}{2}', graded by math-verify); `start`/`steps` exist for synthetic problems."""

    id: str
    question: str
    answer: float | str
    name: str = ""
    item: str = ""
    start: int = 0
    steps: tuple[Step, ...] = ()
    reference_solution: str = ""  # the worked solution (GSM8K, MATH), when loaded from a file

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


Operation = Literal[tuple(OPERATIONS)]


class TaskSettings(BaseModel):
    """Difficulty of the synthetic task (the `[task]` config section). Negative intermediate values are
    never generated."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # as specialists.config.Strict, which imports this module

    min_operations: int = Field(1, ge=1)
    max_operations: int = Field(2, ge=1)
    max_value: int = Field(20, ge=2, description="start and add/sub operands are drawn from [1, max_value]")
    max_multiplier: int = Field(3, ge=2, description="mul operands are drawn from [2, max_multiplier]")
    operations: tuple[Operation, ...] = Field(("add", "sub", "mul"), min_length=1)

    @model_validator(mode="after")
    def _ordered(self) -> "TaskSettings":
        if self.min_operations > self.max_operations:
            raise SettingsError("min_operations must be <= max_operations", "min_operations", "max_operations")
        return self


PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"


def prompt_text(problem: Problem, template: str = PROMPT_TEMPLATE) -> str:
    """The problem through a format string over its fields. The built-in template gives no format
    instruction: which format to use is the model's own choice. (specialists.prompting.Prompter adds a
    tokenizer's special tokens and chat template.)"""
    return template.format(**{field.name: getattr(problem, field.name) for field in fields(problem)})


EVAL_BUCKET_SHARE = 0.2  # a fifth of all possible problems belong to evaluation splits
SPLIT_SHARE = {"train": 1 - EVAL_BUCKET_SHARE, "eval": EVAL_BUCKET_SHARE}


def _is_eval_problem(question: str) -> bool:
    digest = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < EVAL_BUCKET_SHARE


def _random_problem(rng: random.Random, config: TaskSettings) -> Problem:
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


def count_problems(config: TaskSettings, at_most: int) -> int:
    """How many distinct problems `_random_problem` can write with these settings, counted up to `at_most`
    (the count stops there, so a vast space costs no more than a small one). About SPLIT_SHARE[split] of
    them belong to each split. Every (name, item, start, steps) gives another question; from a value v the
    next step can be: add 1..max_value (also what sub becomes below 2), mul 2..max_multiplier, or sub
    1..min(v - 1, max_value), as far as `operations` allows."""
    per_start = -(-at_most // (len(NAMES) * len(ITEMS)))  # chains per (name, item) that reach at_most

    @functools.cache
    def chains(value: int, length: int) -> int:  # distinct step chains of `length` from `value`, capped
        if length == 0:
            return 1
        options = []  # the values after each possible next step, as ranges
        if "add" in config.operations or ("sub" in config.operations and value < 2):
            options.append(range(value + 1, value + config.max_value + 1))
        if "mul" in config.operations:
            options.append(range(value * 2, value * config.max_multiplier + 1, value))
        if "sub" in config.operations and value >= 2:
            options.append(range(value - 1, value - min(value - 1, config.max_value) - 1, -1))
        total = 0
        for after in itertools.chain(*options):  # every option starts at least one chain, so this loop ends by per_start
            total += chains(after, length - 1)
            if total >= per_start:
                return per_start
        return total

    total = 0
    for length in range(config.min_operations, config.max_operations + 1):
        for start in range(1, config.max_value + 1):
            total += chains(start, length)
            if total >= per_start:
                return at_most
    return min(total * len(NAMES) * len(ITEMS), at_most)


def generate_problems(count: int, seed: int, split: str, config: TaskSettings = TaskSettings()) -> list[Problem]:
    """`count` distinct problems of `split` ("train" or "eval"), the same for the same seed and config.

    Raises UserError when the configuration's problem space cannot supply `count` distinct problems (configs
    are checked for that when loaded, with `count_problems`).
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
                         easy: TaskSettings = TaskSettings(min_operations=1, max_operations=2),
                         hard: TaskSettings = TaskSettings(min_operations=3, max_operations=4),
                         ) -> tuple[list[Problem], list[Problem]]:
    """The paper's transfer split: train on short chains, evaluate on longer ones (disjoint by length and bucket)."""
    if hard.min_operations <= easy.max_operations:
        raise ValueError("hard problems must have more operations than easy ones")
    return generate_problems(train_count, seed, "train", easy), generate_problems(eval_count, seed, "eval", hard)


# ---------------------------------------------------------------- numbers and the bundled GSM8K excerpt


def parse_number(text: str) -> float:
    """'1,234' -> 1234.0; '$5' is not accepted (strip units before)."""
    return float(text.replace(",", ""))


BUNDLED_GSM8K_EXCERPT = Path(__file__).parent / "data" / "gsm8k_excerpt.jsonl"
