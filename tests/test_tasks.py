import json
import random

import pytest

from specialists.errors import UserError
from specialists.tasks import (BUNDLED_GSM8K_EXCERPT, TaskSettings, _random_problem, count_problems, easy_train_hard_eval,
                               generate_problems, parse_number)
from specialists.prompt_data import read_problems


def test_generation_is_seeded_and_answers_follow_the_steps():
    first = generate_problems(50, seed=3, split="train")
    assert first == generate_problems(50, seed=3, split="train")
    assert first != generate_problems(50, seed=4, split="train")
    for problem in first:
        assert problem.intermediate_values()[-1] == problem.answer
        assert all(value >= 0 for value in problem.intermediate_values())


def test_train_and_eval_are_disjoint_by_construction():
    train = {p.question for p in generate_problems(2000, seed=0, split="train")}
    evaluation = {p.question for p in generate_problems(500, seed=0, split="eval")}
    assert not train & evaluation
    # Disjoint across seeds too: the split is a property of the problem, not of the draw.
    assert not train & {p.question for p in generate_problems(500, seed=1, split="eval")}


def test_difficulty_knobs():
    hard = generate_problems(100, 0, "train", TaskSettings(min_operations=3, max_operations=4, max_value=50))
    assert all(3 <= len(p.steps) <= 4 for p in hard)
    easy, harder = easy_train_hard_eval(100, 50, seed=0)
    assert max(len(p.steps) for p in easy) < min(len(p.steps) for p in harder)


def test_exhausted_problem_space_is_a_user_error():
    tiny = TaskSettings(min_operations=1, max_operations=1, max_value=2, max_multiplier=2, operations=("add",))
    with pytest.raises(UserError, match="distinct"):
        generate_problems(10_000, 0, "train", tiny)


@pytest.mark.parametrize("task, expected", [
    # 8 names x 8 items x start in 1..2 x one add of 1..2: 64 * 2 * 2
    (TaskSettings(min_operations=1, max_operations=1, max_value=2, operations=("add",)), 256),
    # start 1..3, one step: add 1..3 (3) or mul 2 (1), plus sub 1..v-1 (0, 1, 2 for v = 1, 2, 3); below 2 sub
    # becomes add, which is already counted: 64 * (3 * 4 + 0 + 1 + 2)
    (TaskSettings(min_operations=1, max_operations=1, max_value=3, max_multiplier=2), 960),
    # sub only: from v >= 2, sub 1..v-1; from 1, an add of 1..2 (sub's stand-in). Chains of 1 or 2 steps, v0 in 1..2:
    # length 1: v0=1 -> 2 (add 1, 2); v0=2 -> 1 (sub 1). length 2: 1 -> {2: 1 chain, 3: 2 chains}; 2 -> {1: 2 chains}
    (TaskSettings(min_operations=1, max_operations=2, max_value=2, operations=("sub",)), 64 * (2 + 1 + 3 + 2)),
])
def test_count_problems_counts_what_the_generator_can_write(task, expected):
    assert count_problems(task, at_most=10**9) == expected
    assert count_problems(task, at_most=100) == 100  # counted only as far as asked
    rng = random.Random(0)  # 50,000 draws find every problem: the rarest has probability >= 1/(64 * 27)
    assert len({_random_problem(rng, task).question for _ in range(50_000)}) == expected


def test_count_problems_of_the_default_task_is_vast():
    assert count_problems(TaskSettings(), at_most=10**6) == 10**6


def test_gsm8k_loader_reads_answers_and_commas():
    problems = read_problems(BUNDLED_GSM8K_EXCERPT)
    assert len(problems) == 64
    assert problems[0].answer == 18  # Janet's ducks
    assert parse_number("70,000") == 70000


def test_gsm8k_loader_reads_the_socratic_variant():
    problems = read_problems(BUNDLED_GSM8K_EXCERPT.with_name("gsm8k_socratic_excerpt.jsonl"))
    assert [p.answer for p in problems[:2]] == [18, 3]
    assert "**" in problems[0].reference_solution


def test_gsm8k_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_problems(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"bad\.jsonl line 2: not valid JSON"):
        read_problems(bad)
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(UserError, match="holds no answer"):
        read_problems(bad)
