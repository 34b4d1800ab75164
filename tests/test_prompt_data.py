"""Real prompt data (`[rl] prompts`): JSONL, Parquet and `datasets.save_to_disk` files read into problems with
GSM8K- and MATH-style answers, the config's column checks, the held-out split, and MATH answers graded through
the grader. GSM8K rows are the bundled excerpt of the real test set; MATH rows are written here in the real
dataset's shape (problem, level, type, solution with a \\boxed{} answer)."""

from __future__ import annotations

import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments.config import ExperimentConfig, validate
from rl.config import RLSettings
from specialists.errors import UserError
from specialists.formats import FORMAT_SETS
from specialists.grading import answer_text, grade_completions
from specialists.prompt_data import (PromptColumns, gold_answer, last_boxed, normalised_question, prompt_split,
                                     read_problems)
from specialists.sandbox import Sandbox
from specialists.tasks import BUNDLED_GSM8K_EXCERPT

from test_cli_errors import assert_one_line_error, run_cli

GSM8K_ROWS = [json.loads(line) for line in BUNDLED_GSM8K_EXCERPT.read_text().splitlines()[:6]]
MATH_ROWS = [
    {"problem": "What is $\\frac{3}{6}$ in lowest terms?", "level": "Level 1", "type": "Prealgebra",
     "solution": "Divide top and bottom by 3: $\\frac{3}{6} = \\boxed{\\frac{1}{2}}$."},
    {"problem": "Simplify $\\sqrt{12}$.", "level": "Level 2", "type": "Algebra",
     "solution": "$\\sqrt{12} = \\sqrt{4 \\cdot 3} = \\boxed{2\\sqrt{3}}$."},
    {"problem": "Evaluate $\\frac{\\sqrt{2}}{2} \\cdot \\sqrt{2}$ and write the result over $x+1$.",
     "level": "Level 3", "type": "Algebra",
     "solution": "First $\\boxed{1}$ is wrong; the product is $1$, so the answer is $\\boxed{\\frac{1}{x+1}}$."},
    {"problem": "How many positive divisors does 12 have?", "level": "Level 1", "type": "Number Theory",
     "solution": "They are 1, 2, 3, 4, 6 and 12, so there are $\\boxed{6}$."},
]
MATH_COLUMNS = PromptColumns(question="problem", answer="solution")
# MATH-500 (HuggingFaceH4/MATH-500, test split) rows in the real shape: a bare LaTeX `answer` beside the solution.
MATH500_ROWS = [
    {"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your answer in the "
                "form $(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$",
     "solution": "We have that $r = \\sqrt{0^2 + 3^2} = 3.$ ... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
     "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
     "unique_id": "test/precalculus/807.json"},
    {"problem": "If $f(x) = \\frac{3x-2}{x-2}$, what is the value of $f(-2) +f(-1)+f(0)$? Express your answer as a "
                "common fraction.",
     "solution": "$f(-2)+f(-1)+f(0)=2+\\frac{5}{3}+1=\\boxed{\\frac{14}{3}}$",
     "answer": "\\frac{14}{3}", "subject": "Algebra", "level": 3, "unique_id": "test/algebra/2584.json"},
    {"problem": "How many positive whole-number divisors does 196 have?",
     "solution": "First prime factorize $196=2^2\\cdot7^2$. ... $(2+1)(2+1)=\\boxed{9}$ divisors.",
     "answer": "9", "subject": "Number Theory", "level": 3, "unique_id": "test/number_theory/572.json"},
    {"problem": "The results of a cross-country team's training run are graphed below. Which student has the "
                "greatest average speed?",
     "solution": "Evelyn covered more distance in less time than Briana, Debra and Angela, so ... "
                 "$\\boxed{\\text{Evelyn}}.$",
     "answer": "\\text{Evelyn}", "subject": "Algebra", "level": 2, "unique_id": "test/algebra/1349.json"},
]
MATH500_COLUMNS = PromptColumns(question="problem", answer="answer")
MATH_GOLD = ["\\frac{1}{2}", "2\\sqrt{3}", "\\frac{1}{x+1}", 6.0]  # the last boxed; a plain number is a number


def write(rows: list[dict], path, kind: str):
    """`rows` as a JSONL file, a Parquet file or a datasets.save_to_disk directory."""
    if kind == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "dataset"])
def test_each_kind_of_file_reads_into_the_right_problems(kind, tmp_path):
    gsm8k = read_problems(write(GSM8K_ROWS, tmp_path / "gsm8k", kind))
    # the excerpt's solutions end in "#### 18", "#### 3", ...: the numbers after ####
    expected = [float(row["answer"].rsplit("####", 1)[1].replace(",", "")) for row in GSM8K_ROWS]
    assert [p.answer for p in gsm8k] == expected and expected[:2] == [18.0, 3.0]
    assert [p.question for p in gsm8k] == [row["question"] for row in GSM8K_ROWS]
    assert [p.id for p in gsm8k] == [f"gsm8k-{i}" for i in range(len(GSM8K_ROWS))]
    assert gsm8k[0].reference_solution == GSM8K_ROWS[0]["answer"]

    math = read_problems(write(MATH_ROWS, tmp_path / "math", kind), MATH_COLUMNS)
    assert [p.answer for p in math] == MATH_GOLD
    assert [p.question for p in math] == [row["problem"] for row in MATH_ROWS]


@pytest.mark.parametrize("cell, gold", [
    ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", 72.0),
    ("So the total is 1,234.\n#### 1,234", 1234.0),
    ("#### -3.5", -3.5),
    ("72", 72.0), (" 1,000 ", 1000.0), (5, 5.0), (2.5, 2.5),  # bare numbers, as text or as numbers
    ("so $x = \\boxed{\\frac{\\sqrt{2}}{2}}$.", "\\frac{\\sqrt{2}}{2}"),  # nested braces
    ("\\boxed{\\left(1, \\frac{1}{2}\\right)}", "\\left(1, \\frac{1}{2}\\right)"),
    ("\\boxed{0.5}", 0.5),
    ("The answer is seven.", None), ("\\boxed{\\frac{1}{2}", None), ("", None), (None, None), (float("nan"), None),
    (True, None),
])
def test_gold_answers_of_gsm8k_and_math_cells(cell, gold):
    assert gold_answer(cell) == gold


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_math500_answer_column_of_bare_latex_is_read_and_graded_by_math_verify(kind, tmp_path):
    """MATH-500's `answer` column holds bare LaTeX: each cell is the gold answer as it is (a plain number as the
    number), graded by math-verify like a \\boxed{} answer; a sentence in an answer cell is still no answer."""
    problems = read_problems(write(MATH500_ROWS, tmp_path / "math500", kind), MATH500_COLUMNS)
    assert [p.answer for p in problems] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "\\frac{14}{3}", 9.0,
                                            "\\text{Evelyn}"]
    polar, fraction, divisors, _ = problems
    completions = ["So the point is \\boxed{(3, \\frac{\\pi}{2})}", "So the point is \\boxed{(3, \\pi)}",
                   "The sum is \\boxed{\\frac{28}{6}}", "The sum is \\boxed{\\frac{14}{5}}", "There are \\boxed{9}"]
    golds = [polar.answer] * 2 + [fraction.answer] * 2 + [divisors.answer]
    with Sandbox() as sandbox:
        grades = grade_completions(completions, golds, FORMAT_SETS["synthetic"], sandbox)
    assert [g.correct for g in grades] == [True, False, True, False, True]

    sentence = [dict(MATH500_ROWS[1], answer="The sum is fourteen thirds")]
    with pytest.raises(UserError, match=r"row 0: column 'answer' holds no answer"):
        read_problems(write(sentence, tmp_path / "sentence", kind), MATH500_COLUMNS)


def test_last_boxed_matches_braces():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{a}{\\sqrt{b}}} end") == "\\frac{a}{\\sqrt{b}}"
    assert last_boxed("no box") is None


def test_a_row_without_an_answer_is_named(tmp_path):
    rows = MATH_ROWS[:2] + [{"problem": "Unanswered?", "solution": "We do not know."}]
    path = write(rows, tmp_path / "math", "jsonl")
    with pytest.raises(UserError, match=r"math.jsonl: row 2: column 'solution' holds no answer"):
        read_problems(path, MATH_COLUMNS)


def load(rl: dict) -> ExperimentConfig:
    return validate({"rl": rl}, ExperimentConfig, lambda keys: "config.toml")


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "dataset"])
def test_wrong_columns_are_refused_in_one_line_when_the_config_is_loaded(kind, tmp_path):
    path = write(MATH_ROWS, tmp_path / "math", kind)
    with pytest.raises(UserError) as error:
        load({"prompts": str(path)})  # GSM8K's column names, a MATH file
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"config.toml: rl.prompts: {path} has no question column 'question'")
    assert "its columns: problem, level, type, solution" in message
    with pytest.raises(UserError, match="has no answer column 'answer'"):
        load({"prompts": str(path), "prompt_columns": {"question": "problem"}})
    assert load({"prompts": str(path), "prompt_columns": {"question": "problem", "answer": "solution"}})


@pytest.mark.parametrize("rl, fragment", [
    ({"prompts": "no/such.jsonl"}, "rl.prompts: file not found: no/such.jsonl"),
    ({"prompts": "README.md"}, "unsupported prompt file; expected a .jsonl file, a .parquet file or a "
                               "datasets.save_to_disk directory"),
    ({"prompts": "tests"}, "tests is a directory but not a datasets.save_to_disk directory"),
    ({"heldout_fraction": 0.1}, "synthetic prompts have their own held-out split"),
    ({"prompts": str(BUNDLED_GSM8K_EXCERPT), "heldout_fraction": 0.1, "heldout_prompts": str(BUNDLED_GSM8K_EXCERPT)},
     "give heldout_prompts or heldout_fraction, not both"),
    ({"prompts": str(BUNDLED_GSM8K_EXCERPT), "heldout_prompts": "no/such.parquet"}, "rl.heldout_prompts: file not found"),
    ({"prompts": str(BUNDLED_GSM8K_EXCERPT), "heldout_fraction": 1.0}, "rl.heldout_fraction: Input should be less than 1"),
    ({"prompts": str(BUNDLED_GSM8K_EXCERPT), "prompt_columns": {"question": "q", "solution": "s"}},
     "unknown key rl.prompt_columns.solution (did you mean rl.prompt_columns.question?); allowed in "
     "rl.prompt_columns: answer, question"),
])
def test_bad_prompt_settings_are_refused_when_loaded(rl, fragment):
    with pytest.raises(UserError) as error:
        load(rl)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_dataset_dict_is_refused_with_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(GSM8K_ROWS[:3]), "test": Dataset.from_list(GSM8K_ROWS[3:])}).save_to_disk(
        str(tmp_path / "gsm8k"))
    with pytest.raises(UserError, match=r"DatasetDict with splits train, test: point at one split's directory"):
        load({"prompts": str(tmp_path / "gsm8k")})
    assert [p.answer for p in read_problems(tmp_path / "gsm8k" / "test")] == [p.answer for p in read_problems(
        write(GSM8K_ROWS[3:], tmp_path / "test", "jsonl"))]


def test_echolab_run_refuses_wrong_columns_in_one_line_before_any_work(tmp_path):
    path = write(MATH_ROWS, tmp_path / "math", "parquet")
    (tmp_path / "config.toml").write_text(f'[rl]\nprompts = "{path}"\nprompt_columns = {{question = "problem"}}\n')
    result = run_cli("run", str(tmp_path / "config.toml"), "--out", str(tmp_path / "run"))
    assert_one_line_error(result, "rl.prompts:", "has no answer column 'answer'", "its columns: problem, level, type, solution")
    assert not (tmp_path / "run").exists()


def test_heldout_fraction_is_seeded_disjoint_and_deterministic(tmp_path):
    path = write(GSM8K_ROWS * 1 + [json.loads(line) for line in BUNDLED_GSM8K_EXCERPT.read_text().splitlines()[6:40]],
                 tmp_path / "gsm8k", "parquet")  # 40 distinct questions
    split = prompt_split(path, heldout_fraction=0.25, seed=3)
    assert (len(split.train), len(split.heldout)) == (30, 10)  # round(0.25 * 40) held out
    assert {p.id for p in split.train}.isdisjoint(p.id for p in split.heldout)
    assert {p.id for p in split.train} | {p.id for p in split.heldout} == {f"gsm8k-{i}" for i in range(40)}
    assert [p.id for p in split.train] == sorted((p.id for p in split.train), key=lambda i: int(i.split("-")[1]))
    assert prompt_split(path, heldout_fraction=0.25, seed=3) == split  # deterministic
    assert prompt_split(path, heldout_fraction=0.25, seed=4).heldout != split.heldout  # seeded
    with pytest.raises(UserError, match="must leave at least one on each side"):
        prompt_split(path, heldout_fraction=0.01)  # round(0.4) = 0 held out


def test_repeated_questions_never_cross_the_fraction_split(tmp_path):
    """A question repeated in the file (with other spacing and case) is one question: kept once, on one side."""
    rows = MATH_ROWS + [dict(MATH_ROWS[0], problem="  what is $\\frac{3}{6}$   IN lowest terms? ")]
    path = write(rows, tmp_path / "math", "jsonl")
    with pytest.warns(UserWarning, match="1 repeated questions dropped"):
        split = prompt_split(path, MATH_COLUMNS, heldout_fraction=0.5, seed=0)
    assert len(split.train) == len(split.heldout) == 2
    assert not {normalised_question(p.question) for p in split.train} & {normalised_question(p.question) for p in split.heldout}


def test_an_overlapping_heldout_file_drops_the_overlap_from_the_rl_prompts_with_a_warning(tmp_path):
    train = write(GSM8K_ROWS, tmp_path / "train", "jsonl")
    # the held-out file repeats two training questions, one with other whitespace and case
    overlap = [GSM8K_ROWS[1], dict(GSM8K_ROWS[4], question="  " + GSM8K_ROWS[4]["question"].upper().replace(" ", "\n "))]
    heldout_rows = overlap + [json.loads(line) for line in BUNDLED_GSM8K_EXCERPT.read_text().splitlines()[10:13]]
    heldout = write(heldout_rows, tmp_path / "test", "parquet")
    with pytest.warns(UserWarning, match=r"train.jsonl: 2 of 6 questions are also in the held-out file .*test.parquet; "
                                         r"they are dropped from the RL prompts"):
        split = RLSettings(prompts=str(train), heldout_prompts=str(heldout)).prompt_split()
    assert [p.id for p in split.train] == ["train-0", "train-2", "train-3", "train-5"]
    assert [p.id for p in split.heldout] == [f"test-{i}" for i in range(5)]  # the held-out file stays whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overlap, no warning
        RLSettings(prompts=str(train), heldout_prompts=str(write(heldout_rows[2:], tmp_path / "clean", "jsonl"))).prompt_split()
    with pytest.raises(UserError, match="every question is also in the held-out file"), pytest.warns(UserWarning):
        prompt_split(train, heldout_path=train)


def test_math_answers_are_graded_by_equivalence_through_the_grader(tmp_path):
    problems = read_problems(write(MATH_ROWS, tmp_path / "math", "parquet"), MATH_COLUMNS)
    half, root = problems[0], problems[1]
    completions = [
        "Three sixths is a half.\nThe answer is \\boxed{0.5}",  # \frac{1}{2} written as a decimal
        "Halve it.\nThe answer is \\boxed{\\dfrac{1}{2}}",
        "Wrongly, \\boxed{\\frac{1}{3}}",
        "12 = 4 * 3, so\n\\boxed{\\sqrt{12}}",  # 2\sqrt{3}, unsimplified
        "So the answer is \\boxed{3\\sqrt{2}}",
    ]
    golds = [half.answer] * 3 + [root.answer] * 2
    with Sandbox() as sandbox:
        grades = grade_completions(completions, golds, FORMAT_SETS["synthetic"], sandbox)
    assert [g.format for g in grades] == ["natural_language"] * 5
    assert [g.correct for g in grades] == [True, True, False, True, False]
    assert [g.reason for g in grades] == ["correct", "correct", "wrong", "correct", "wrong"]


def test_echolab_run_samples_the_prompt_file_and_evaluates_its_heldout_split(tmp_path, monkeypatch):
    """A tiny run on a local Llama checkpoint (no pretraining; transformers rollouts): every rollout's prompt is a
    question of the JSONL file outside its held-out fraction, with that row's gold answer; `evaluate` samples the
    held-out problems."""
    from experiments.pipeline import run_experiment
    from model_families import build_checkpoint
    from specialists.evaluate import evaluate

    monkeypatch.setenv("ECHOLAB_CACHE", str(tmp_path / "cache"))
    rows = [json.loads(line) for line in BUNDLED_GSM8K_EXCERPT.read_text().splitlines()[:12]]
    prompts = write(rows, tmp_path / "gsm8k", "jsonl")
    config = ExperimentConfig.model_validate({
        "model": {"path": str(build_checkpoint("llama", tmp_path / "base"))},
        "rl": {"prompts": str(prompts), "heldout_fraction": 0.25, "steps": 2, "prompts_per_step": 3,
               "num_prompts": 6, "checkpoint_every": 1, "learning_rate": 1e-3, "prompt_template": "Q: {question}\nA:",
               "sampling": {"samples_per_prompt": 2, "max_new_tokens": 8}, "engine": {"kind": "hf"}}})
    split = config.rl.prompt_split()
    assert (len(split.train), len(split.heldout)) == (9, 3)
    run_experiment(config, tmp_path / "run", progress=False)
    table = pa.concat_tables(pq.read_table(path) for path in sorted((tmp_path / "run" / "rollouts").glob("*.parquet")))
    rollouts = table.to_pylist()
    assert len(rollouts) >= 2 * 3 * 2
    by_id = {p.id: p for p in split.train[:6]}  # num_prompts: the first 6 RL prompts in file order
    for row in rollouts:
        problem = by_id[row["prompt_id"]]
        assert row["prompt"].endswith(f"Q: {problem.question}\nA:") and row["answer"] == answer_text(problem.answer)
    assert len({row["prompt_id"] for row in rollouts}) >= 3
    heldout_questions = {p.question for p in split.heldout}
    assert not any(question in row["prompt"] for row in rollouts for question in heldout_questions)

    result = evaluate(config.model.path, config.specialists(), progress=False, heldout=split.heldout)
    assert result["num_samples"] == 3


def test_echolab_evaluate_refuses_a_prompt_file_without_a_heldout_split(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "config.toml").write_text(f'[rl]\nprompts = "{BUNDLED_GSM8K_EXCERPT}"\n')
    result = run_cli("evaluate", str(tmp_path / "config.toml"), str(tmp_path / "model"))
    assert_one_line_error(result, "without a held-out split: set rl.heldout_prompts or rl.heldout_fraction")


def test_echolab_evaluate_prompts_the_heldout_split_with_the_runs_template(tiny_moe_dir, tmp_path, monkeypatch):
    """`echolab evaluate` on a config with a prompt file and rl.prompt_template samples the held-out problems
    prompted as the run's rollouts are, not with the built-in template."""
    import specialists.evaluate
    from experiments.cli import main
    from experiments.config import load_experiment_config

    config = tmp_path / "config.toml"
    config.write_text(f'''[model]
kind = "moe"
hidden_size = 64
num_layers = 2
num_heads = 2
num_kv_heads = 1
head_dim = 32
expert_size = 128

[evaluation]
num_problems = 3
max_new_tokens = 8

[rl]
prompts = "{BUNDLED_GSM8K_EXCERPT}"
heldout_fraction = 0.25
prompt_template = "Problem: {{question}}\\nSolution:\\n"
''')
    sampled = []

    def recording(model, tokenizer, prompts, *args, **kwargs):
        sampled.extend(prompts)
        return original(model, tokenizer, prompts, *args, **kwargs)

    original = specialists.evaluate.sample_completions
    monkeypatch.setattr(specialists.evaluate, "sample_completions", recording)
    assert main(["evaluate", str(config), str(tiny_moe_dir), "--out", str(tmp_path / "evaluation.json"), "--quiet"]) == 0
    heldout = load_experiment_config(config).rl.prompt_split().heldout[:3]
    assert sampled == [f"Problem: {problem.question}\nSolution:\n" for problem in heldout]
