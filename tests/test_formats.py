import pytest

from specialists.errors import UserError
from specialists.formats import (DIFFICULTIES, FORMAT_SETS, GSM8K, NATURAL_LANGUAGE, OTHER, classify, load_formats,
                                 parse_answer)
from specialists.grading import grade_completions
from specialists.sandbox import Sandbox
from specialists.tasks import BUNDLED_GSM8K_EXCERPT, generate_problems, load_gsm8k

SYNTHETIC = FORMAT_SETS["synthetic"]
ECHO = FORMAT_SETS["echo-chamber"]


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox() as box:
        yield box


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_every_rendered_solution_is_recognised_and_graded_correct(difficulty, sandbox):
    problems = generate_problems(30, seed=0, split="eval")
    for definition in SYNTHETIC:
        texts = [definition.render(p, difficulty) for p in problems]
        assert [classify(t, SYNTHETIC) for t in texts] == [definition.name] * len(texts)
        assert [classify(t, ECHO) for t in texts] == [definition.name] * len(texts)
        grades = grade_completions(texts, [p.answer for p in problems], SYNTHETIC, sandbox)
        assert all(g.correct and g.reason == "correct" for g in grades), (definition.name, grades)


def test_code_answers_come_from_running_the_code_not_from_written_numbers(sandbox):
    # The written output says 99, the code computes 5: the sandbox's 5 is the answer.
    text = "<llm-code>\nx = 2\nx = x + 3\nprint(x)\n</llm-code>\n<llm-code-output>\n99\n</llm-code-output>"
    [grade] = grade_completions([text], [5.0], SYNTHETIC, sandbox)
    assert (grade.format, grade.answer, grade.correct) == ("llm_code", 5.0, True)


def test_forbidden_and_failing_code_is_graded_with_its_reason(sandbox):
    texts = ["def simple_math_problem():\n    import os\n    return 1",
             "def simple_math_problem():\n    return 1 / 0",
             "def simple_math_problem():\n    x = 3\n    return x"]
    grades = grade_completions(texts, [1.0, 1.0, 4.0], SYNTHETIC, sandbox)
    assert [g.reason for g in grades] == ["forbidden", "error", "wrong"]


def test_detection_is_anchored_not_a_substring():
    # The paper's detector called this code because it contains "def".
    assert classify("I definitely think so. The answer is 5.", ECHO) == "natural_language"
    assert classify("Let me define simple_math_problem() later. The answer is 5.", ECHO) == "natural_language"
    assert classify("We use <llm-code> tags sometimes. The answer is 5.", ECHO) == "natural_language"
    assert classify("def simple_math_problem():\n    x = 1", ECHO) == OTHER  # no return: not a finished function
    assert classify("<llm-code>\nprint(1)\n", ECHO) == OTHER  # unclosed tag
    assert classify("some words without any answer", ECHO) == OTHER
    assert classify("", ECHO) == OTHER


def test_natural_language_answer_forms():
    for text, answer in [("So she has 5 left.\nThe answer is 5.", 5.0), ("Thus \\boxed{1,200}.", 1200.0),
                         ("The final answer is: \\boxed{3.5}", 3.5), ("It costs $4.\nThe answer is $4.", 4.0)]:
        assert classify(text, ECHO) == "natural_language"
        assert NATURAL_LANGUAGE.written_answer(text) == answer


def test_gsm8k_reference_solutions_are_gsm8k_format_with_their_answers():
    problems = load_gsm8k(BUNDLED_GSM8K_EXCERPT)
    for problem in problems:
        assert classify(problem.reference_solution, ECHO) == "gsm8k"
        assert GSM8K.written_answer(problem.reference_solution) == problem.answer


def test_parse_answer():
    assert parse_answer("1,234") == 1234.0
    assert parse_answer("$5") == 5.0
    assert parse_answer("abc") is None
    assert parse_answer("inf") is None


def test_user_formats_from_toml_and_yaml(tmp_path, sandbox):
    toml = tmp_path / "formats.toml"
    toml.write_text(
        '[[format]]\nname = "boxed"\ndetect = \'(?s).*\\\\boxed\\{.+\\}\'\nanswer = \'\\\\boxed\\{(?P<answer>[^}]+)\\}\'\n'
        '[[format]]\nname = "program"\ndetect = \'(?s)<code>.*</code>\'\ncode = \'(?s)<code>(?P<code>.*)</code>\'\ncall = "solve"\n')
    formats = load_formats(toml)
    assert [f.name for f in formats] == ["boxed", "program"]
    texts = ["so \\boxed{7}", "<code>def solve():\n    return 3 * 4</code>", "nothing"]
    grades = grade_completions(texts, [7.0, 12.0, 1.0], formats, sandbox)
    assert [(g.format, g.correct) for g in grades] == [("boxed", True), ("program", True), (OTHER, False)]
    yaml = tmp_path / "formats.yaml"
    yaml.write_text("format:\n  - name: hashes\n    detect: '(?s).*#### \\d+'\n    answer: '#### (?P<answer>\\d+)'\n")
    assert [f.name for f in load_formats(yaml)] == ["hashes"]


@pytest.mark.parametrize("content, message", [
    ("[[format]]\nname = 'x'\n", "needs 'name' and 'detect'"),
    ("[[format]]\nname = 'x'\ndetect = 'a'\nanswer = 'a'\n", "named group"),
    ("[[format]]\nname = 'x'\ndetect = '('\nanswer = '(?P<answer>a)'\n", "bad pattern"),
    ("[[format]]\nname = 'x'\ndetect = 'a'\nanswer = '(?P<answer>a)'\ncolour = 'red'\n", "unknown keys"),
    ("[[format]]\nname = 'other'\ndetect = 'a'\nanswer = '(?P<answer>a)'\n", "reserved"),
    ("title = 'no formats'\n", "non-empty list"),
])
def test_bad_format_files_are_user_errors(tmp_path, content, message):
    path = tmp_path / "formats.toml"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_formats(path)


def test_unknown_format_set_is_a_user_error():
    with pytest.raises(UserError, match="unknown format set"):
        load_formats("no-such-set")
