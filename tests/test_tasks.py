import json

import pytest

from specialists.errors import UserError
from specialists.tasks import (BUNDLED_GSM8K_EXCERPT, TaskConfig, easy_train_hard_eval, generate_problems, load_gsm8k,
                               parse_number)


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
    hard = generate_problems(100, 0, "train", TaskConfig(min_operations=3, max_operations=4, max_value=50))
    assert all(3 <= len(p.steps) <= 4 for p in hard)
    easy, harder = easy_train_hard_eval(100, 50, seed=0)
    assert max(len(p.steps) for p in easy) < min(len(p.steps) for p in harder)


def test_exhausted_problem_space_is_a_user_error():
    with pytest.raises(UserError, match="distinct"):
        generate_problems(10_000, 0, "train", TaskConfig(1, 1, max_value=2, max_multiplier=2, operations=("add",)))


def test_gsm8k_loader_reads_answers_and_commas():
    problems = load_gsm8k(BUNDLED_GSM8K_EXCERPT)
    assert len(problems) == 64
    assert problems[0].answer == 18  # Janet's ducks
    assert parse_number("70,000") == 70000


def test_gsm8k_loader_reads_the_socratic_variant():
    problems = load_gsm8k(BUNDLED_GSM8K_EXCERPT.with_name("gsm8k_socratic_excerpt.jsonl"))
    assert [p.answer for p in problems[:2]] == [18, 3]
    assert "**" in problems[0].reference_solution


def test_gsm8k_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_gsm8k(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
    with pytest.raises(UserError, match=":2:"):
        load_gsm8k(bad)
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(UserError, match="####"):
        load_gsm8k(bad)
