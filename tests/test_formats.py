import pytest

from specialists.errors import UserError
from specialists.formats import (DIFFICULTIES, FORMAT_SETS, GSM8K, LLM_CODE, NATURAL_LANGUAGE, OTHER, classify,
                                 load_formats, parse_answer)
from specialists.grading import answer_key, answer_text, answers_equal, grade_completions
from specialists.sandbox import Sandbox
from specialists.prompt_data import read_problems
from specialists.tasks import BUNDLED_GSM8K_EXCERPT, generate_problems

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
    assert (grade.format, grade.answer, grade.correct) == ("llm_code", "5", True)


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
    for text, answer in [("So she has 5 left.\nThe answer is 5.", "5"), ("Thus \\boxed{1,200}.", "1200"),
                         ("The final answer is: \\boxed{3.5}", "3.5"), ("It costs $4.\nThe answer is $4.", "4"),
                         ("So 7 + 5 = 12.\nThe answer is: 12", "12"), ("Hence $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}")]:
        assert classify(text, ECHO) == "natural_language"
        assert answer_key(NATURAL_LANGUAGE.written_answer(text)) == answer


def test_gsm8k_reference_solutions_are_gsm8k_format_with_their_answers():
    problems = read_problems(BUNDLED_GSM8K_EXCERPT)
    for problem in problems:
        assert classify(problem.reference_solution, ECHO) == "gsm8k"
        assert parse_answer(GSM8K.written_answer(problem.reference_solution)) == problem.answer


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


# ---------------------------------------------------------------- the real datasets' shapes (our own examples)

TINYGSM = '''def simple_math_problem() -> int:
    """
    A baker makes 24 rolls and sells 3 bags of 5 rolls. How many rolls are left?
    """
    rolls_made = 24
    rolls_per_bag = 5
    bags_sold = 3
    rolls_sold = rolls_per_bag * bags_sold
    result = rolls_made - rolls_sold
    return result'''
# OpenMathInstruct-1: a prose lead-in, notebook cells whose bare last expression is the output, closing \boxed{}.
OPENMATH_BOXED = '''Let's solve this problem using Python code.
<llm-code>
rolls_made = 24
rolls_sold = 3 * 5
rolls_left = rolls_made - rolls_sold
rolls_left
</llm-code>
<llm-code-output>
9
</llm-code-output>
Thus the baker has \\boxed{9} rolls left.'''
OPENMATH_CELLS = '''First the rolls sold.
<llm-code>
rolls_sold = 3 * 5
print(rolls_sold)
</llm-code>
<llm-code-output>
15
</llm-code-output>
Then what is left.
<llm-code>
print("left:")
24 - rolls_sold
</llm-code>
<llm-code-output>
left:
9
</llm-code-output>'''
PROSE_FORMS = ["The baker sold 3 * 5 = 15 rolls.\nSo 24 - 15 = 9 are left.\nThe answer is 9.",
               "24 - 15 = 9\nThe answer is: 9",
               "He sold 15 rolls, so he has $24 - 15 = \\boxed{9}$ rolls left.",
               "The baker sold 3 * 5 = <<3*5=15>>15 rolls.\nHe has 24 - 15 = <<24-15=9>>9 left.\n#### 9"]


def test_real_shapes_are_recognised_and_graded(sandbox):
    texts = [TINYGSM, OPENMATH_BOXED, OPENMATH_CELLS, *PROSE_FORMS]
    assert [classify(t, ECHO) for t in texts] == ["python_function", "llm_code", "llm_code", "natural_language",
                                                 "natural_language", "natural_language", "gsm8k"]
    grades = grade_completions(texts, [9.0] * len(texts), ECHO, sandbox)
    assert [(g.answer, g.reason) for g in grades] == [("9", "correct")] * len(texts)


def test_openmath_cells_run_as_one_notebook(sandbox):
    # Shared state across cells; the last cell's bare expression (9) is the output, not its earlier print.
    program = LLM_CODE.program(OPENMATH_CELLS)
    assert program.preceding == ("rolls_sold = 3 * 5\nprint(rolls_sold)",)
    assert program.source == 'print("left:")\n24 - rolls_sold'
    [result] = sandbox.run([program])
    assert result.value == "9"
    # Without a bare expression the last printed line counts; what an earlier cell printed never does.
    one_cell, printed_earlier, statement_last = sandbox.run([
        LLM_CODE.program("<llm-code>\nx = 2; x * 3\n</llm-code>"),
        LLM_CODE.program("<llm-code>\nprint(4)\n</llm-code>\n<llm-code>\nprint(5)\n</llm-code>"),
        LLM_CODE.program("<llm-code>\nprint(4)\n</llm-code>\n<llm-code>\ny = 5\n</llm-code>")])
    assert (one_cell.value, printed_earlier.value) == ("6", "5")
    assert statement_last.value is None


def test_openmath_is_graded_by_its_boxed_answer_as_the_dataset_is(sandbox):
    # NeMo-Skills' predicted_answer is the last \boxed{}: here 8, although the code computes 9.
    wrong_box = OPENMATH_BOXED.replace("\\boxed{9}", "\\boxed{8}")
    [boxed, cells] = grade_completions([wrong_box, OPENMATH_CELLS], [9.0, 9.0], ECHO, sandbox)
    assert (boxed.answer, boxed.correct) == ("8", False)
    assert (cells.answer, cells.correct) == ("9", True)  # no \boxed{}: the notebook's output


def test_prose_with_a_code_block_is_not_plain_prose():
    for text in ["Let me compute it.\n```python\nprint(24 - 15)\n```\nThe answer is 9.",
                 "Here is code:\ndef solve():\n    return 9\nThe answer is 9.",
                 "Steps:\n    def helper(x):\n        return x\n#### 9"]:
        assert classify(text, ECHO) == OTHER
    for text in ["Let us define the rolls left as r.\nThe answer is 9.", "I definitely get 9.\nThe answer is 9.",
                 "We could write def-style code, but no.\n#### 9"]:
        assert classify(text, ECHO) in ("natural_language", "gsm8k")


def test_latex_answers_are_graded_with_math_verify(sandbox):
    texts = ["So the ratio is \\boxed{\\frac{1}{2}}.", "The answer is $\\dfrac{2}{4}$.", "Hence \\boxed{2\\sqrt{3}}.",
             "The answer is: \\boxed{(1, 3]}", "So \\boxed{\\frac{1}{3}}."]
    golds = ["\\frac{1}{2}", "0.5", "\\sqrt{12}", "(1,3]", "\\frac{1}{2}"]
    grades = grade_completions(texts, golds, ECHO, sandbox)
    assert [g.correct for g in grades] == [True, False, True, True, False]  # "0.5" is a number gold: numbers only
    assert answers_equal("\\frac{2}{4}", "\\frac{1}{2}") and not answers_equal("[1,3)", "(1,3]")


def test_answer_text_and_keys():
    assert answer_text(5.0) == "5" and answer_text(None) is None and answer_text(float("nan")) is None
    assert answer_text(" \\boxed{\\frac{1}{2}}. ") == "\\frac{1}{2}" and answer_text("$18$") == "18"
    assert answer_text("She has 9 left.\n#### 9") == "9"  # a GSM8K reference solution as the gold
    assert [answer_key(a) for a in ("1,234.0", "0.50", "-0", "\\left( \\dfrac{1}{2} \\right)")] == \
        ["1234", "0.5", "0", "(\\frac{1}{2})"]
