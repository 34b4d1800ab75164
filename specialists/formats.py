"""Solution formats: how to render a solution, how to recognise one, how to read its final answer.

A `Format` is one self-contained definition. Recognition is a full match of an anchored pattern
against the whole (stripped) generation, never a substring test: the Echo Chamber paper's detector
labelled prose containing "definitely" as code because it looked for "def". A generation that fits
no format is `other`.

Answers of code formats come from running the code in the sandbox (`specialists.sandbox`), never
from numbers the model wrote next to its code; a format may also name a written final answer
(OpenMathInstruct-1's closing `\\boxed{}`), which then counts where the text has one. Answers are
text: a number ("18", "1,234", "$5") or a LaTeX expression ("\\frac{1}{2}"); `specialists.grading`
compares them with the gold answer.

Built-in sets:
- `synthetic`: the three formats the pretraining data is rendered in, mirroring the paper's
  TinyGSM (a Python function), OpenMathInstruct-1 (code in `<llm-code>` tags followed by its output)
  and OpenMathInstruct-2 / GSM8K (natural-language steps ending in a final-answer sentence).
- `echo-chamber`: the same three as the real datasets write them (TinyGSM's `def simple_math_problem()
  -> int:` with a docstring; OpenMathInstruct-1's prose lead-in, several `<llm-code>` cells with notebook
  semantics and a closing `\\boxed{}`; prose ending in "The answer is N", "The answer is: N" or
  `\\boxed{}`), plus GSM8K's `#### N`. One definition of each format serves both sets: echolab's own
  renderings are one shape of each.
Users add formats from a TOML or YAML file (`load_formats`).
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from specialists.errors import UserError, did_you_mean
from specialists.sandbox import Program
from specialists.tasks import OPERATIONS, Problem

Difficulty = Literal["easy", "hard"]
DIFFICULTIES = ("easy", "hard")
OTHER = "other"

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


@dataclass(frozen=True)
class Format:
    """One solution format.

    detect: full-matched against the stripped generation (re.DOTALL is up to the pattern).
    answer: a pattern searched in the generation; its group `answer` (the last match's) is the written final
        answer.
    code: a pattern whose group `code` is a program; every match is one notebook cell, the cells run in order
        as one program with shared state, and the answer is what the sandbox returns: the value of `call()`
        when `call` is set, else the last cell's output (its bare last expression's value, else the
        program's last printed line).
    A format has an `answer` pattern, a `code` pattern, or both: then the written answer counts where the
    text has one (as OpenMathInstruct-1 grades its `\\boxed{}`), the code's output elsewhere.
    render: (problem, difficulty) -> training text, for formats the synthetic task is written in.
    """

    name: str
    detect: re.Pattern
    answer: re.Pattern | None = None
    code: re.Pattern | None = None
    call: str | None = None
    render: Callable[[Problem, Difficulty], str] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.name == OTHER:
            raise ValueError(f"'{OTHER}' is reserved for generations that fit no format")
        if self.answer is None and self.code is None:
            raise ValueError(f"format {self.name!r}: give an answer pattern, a code pattern or both")
        for group, pattern in (("answer", self.answer), ("code", self.code)):
            if pattern is not None and group not in pattern.groupindex:
                raise ValueError(f"format {self.name!r}: the {group} pattern needs a named group (?P<{group}>...)")

    def matches(self, completion: str) -> bool:
        return self.detect.fullmatch(completion.strip()) is not None

    def written_answer(self, completion: str) -> str | None:
        """The final answer written in the text (the last match of the `answer` pattern), else None."""
        if self.answer is None:
            return None
        found = None
        for found in self.answer.finditer(completion.strip()):
            pass
        return found.group("answer").strip() if found else None

    def program(self, completion: str) -> Program | None:
        """The program to run for the answer (formats with a `code` pattern), else None."""
        if self.code is None:
            return None
        cells = [found.group("code") for found in self.code.finditer(completion.strip())]
        if not cells:
            return None
        if self.call is None:  # notebook cells: shared globals, the answer is what the last cell shows
            return Program.notebook(cells)
        return Program("\n".join(cells), call=self.call)


def parse_answer(text: str) -> float | None:
    """'1,234' -> 1234.0, '$5' -> 5.0, '3.50' -> 3.5; anything else -> None."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def classify(completion: str, formats: tuple[Format, ...]) -> str:
    """Name of the first format whose pattern fully matches the generation, else `other`."""
    for candidate in formats:
        if candidate.matches(completion):
            return candidate.name
    return OTHER


# ---------------------------------------------------------------- rendering the synthetic task

def _format_int(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _render_python_function(problem: Problem, difficulty: Difficulty) -> str:
    # easy: the checker does the arithmetic; hard: the model must carry precomputed constants.
    variable = problem.item
    lines = ["def simple_math_problem():", f"    {variable} = {problem.start}"]
    for step, value in zip(problem.steps, problem.intermediate_values()[1:]):
        operator = OPERATIONS[step.op][1]
        expression = f"{variable} {operator} {step.value}" if difficulty == "easy" else str(value)
        lines.append(f"    {variable} = {expression}")
    lines.append(f"    return {variable}")
    return "\n".join(lines)


def _render_llm_code(problem: Problem, difficulty: Difficulty) -> str:
    variable = problem.item
    lines = ["<llm-code>", f"{variable} = {problem.start}"]
    for step, value in zip(problem.steps, problem.intermediate_values()[1:]):
        operator = OPERATIONS[step.op][1]
        lines.append(f"{variable} = {variable} {operator} {step.value}" if difficulty == "easy" else f"{variable} = {value}")
    lines += [f"print({variable})", "</llm-code>", "<llm-code-output>", _format_int(problem.answer), "</llm-code-output>"]
    return "\n".join(lines)


def _render_natural_language(problem: Problem, difficulty: Difficulty) -> str:
    # easy: every intermediate result is written down; hard: only the final answer.
    lines = []
    if difficulty == "easy":
        values = problem.intermediate_values()
        for step, before, after in zip(problem.steps, values, values[1:]):
            lines.append(f"{before} {OPERATIONS[step.op][1]} {step.value} = {after}.")
    lines.append(f"The answer is {_format_int(problem.answer)}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- the built-in formats

# A code block opens a line: a fence, an <llm-code> tag or a Python `def name(...):` line. Prose with such a
# line is not plain prose ("define" and "definitely" are words, not code).
_CODE_LINE = r"(?:```|<llm-code>|def [A-Za-z_]\w*\s*\()"
_PLAIN_PROSE = rf"(?!(?:[^\n]*\n)*?[ \t]*{_CODE_LINE})"  # a lookahead at the start of the text
# The content of {...} with up to four levels of nested braces (\frac{\sqrt{2}}{2}); alternatives start with
# different characters, so matching stays linear.
_BRACED = r"(?:[^{}\n]|\{(?:[^{}\n]|\{(?:[^{}\n]|\{[^{}\n]*\})*\})*\})*"
_BOXED = rf"(?P<answer>\\boxed\{{{_BRACED}\}})"

PYTHON_FUNCTION = Format(
    name="python_function",
    description="TinyGSM style: def simple_math_problem() [-> int]: [docstring] ... return <answer>; answer from "
                "calling it in the sandbox",
    # A body line is `[ \t][^\n]*`, not `[ \t]+[^\n]*`, whose two parts could share a line's indentation
    # in many ways: without a return (a truncated function) the engine tried them all, exponential time.
    detect=re.compile(r"(?:```python\n)?def simple_math_problem\(\)(?:\s*->\s*\w+)?:\n(?:[ \t][^\n]*\n|\n)*?[ \t]+return\b[^\n]*(?:\n```)?"),
    code=re.compile(r"(?:```python\n)?(?P<code>def simple_math_problem\(\).*[ \t]+return\b[^\n]*)", re.DOTALL),
    call="simple_math_problem",
    render=_render_python_function,
)

LLM_CODE = Format(
    name="llm_code",
    description="OpenMathInstruct-1 style: optional prose, one or more <llm-code> cells each followed by its "
                "<llm-code-output>, optional closing prose; answer: the last \\boxed{} when there is one (as the "
                "dataset grades), else the code's output run as a notebook",
    detect=re.compile(rf"(?!def |```)(?:[^\n]*\n)*?<llm-code>\n.*?\n</llm-code>(?:\n.*)?", re.DOTALL),
    # NeMo-Skills, which generated and graded OpenMathInstruct-1, reads the answer from the last \boxed{} of
    # the solution (predicted_answer), after the interpreter's outputs were inserted into the text.
    answer=re.compile(_BOXED),
    code=re.compile(r"<llm-code>\n(?P<code>.*?)\n</llm-code>", re.DOTALL),
    render=_render_llm_code,
)

# The final answer on the last line: \boxed{...} anywhere, or after "The (final) answer is(:)" a \boxed{...},
# $...$, \(...\) or one token that starts like a number or a LaTeX expression ("18", "$4.", "\frac{1}{2}").
_ANSWER_VALUE = rf"(?P<answer>\\boxed\{{{_BRACED}\}}|\$[^$\n]+\$|\\\(.+?\\\)|\$?[-\d\\(\[][^\s$]*)"
_ANSWER_MARK = rf"(?:[Tt]he (?:final )?answer is:?[ \t]*|(?=\\boxed\{{)){_ANSWER_VALUE}"

NATURAL_LANGUAGE = Format(
    name="natural_language",
    description="OpenMathInstruct-2 / prose: steps in words without code blocks, the last line saying 'The answer "
                "is N', 'The answer is: N' or \\boxed{N}",
    detect=re.compile(rf"{_PLAIN_PROSE}(?:[^\n]*\n)*[^\n]*{_ANSWER_MARK}[^\n]*"),
    answer=re.compile(rf"(?:\A|\n)[^\n]*{_ANSWER_MARK}[^\n]*\Z"),  # the last line only
    render=_render_natural_language,
)

GSM8K = Format(
    name="gsm8k",
    description="GSM8K reference style: worked steps without code blocks, last line '#### N'",
    detect=re.compile(rf"{_PLAIN_PROSE}(?:[^\n]*\n)*####\s*{_NUMBER}"),
    answer=re.compile(rf"####\s*(?P<answer>{_NUMBER})\Z"),
)

FORMAT_SETS: dict[str, tuple[Format, ...]] = {
    "synthetic": (PYTHON_FUNCTION, LLM_CODE, NATURAL_LANGUAGE),
    "echo-chamber": (PYTHON_FUNCTION, LLM_CODE, GSM8K, NATURAL_LANGUAGE),
}


def load_formats(name_or_path: str | Path) -> tuple[Format, ...]:
    """A built-in set by name, or the user's formats from a TOML or YAML file.

    File layout (TOML shown; YAML is the same keys under a top-level `format:` list):

        [[format]]
        name = "boxed"
        detect = '(?s).*\\\\boxed\\{.+\\}'    # full-matched against the stripped generation
        answer = '\\\\boxed\\{(?P<answer>[^}]+)\\}'

        [[format]]
        name = "program"
        detect = '(?s)<code>.*</code>'
        code = '(?s)<code>(?P<code>.*)</code>'   # run in the sandbox
        call = "solve"                            # optional: the answer is solve()'s return value
    """
    key = str(name_or_path)
    if key in FORMAT_SETS:
        return FORMAT_SETS[key]
    path = Path(key)
    if not path.is_file():
        raise UserError(f"unknown format set {key!r}{did_you_mean(key, FORMAT_SETS)}: not a file, and not one of "
                        f"{sorted(FORMAT_SETS)}")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise UserError(f"{path}: format files must end in .toml, .yaml or .yml")
    document = _read_format_file(path)
    entries = document.get("format") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: expected a non-empty list of [[format]] entries")
    allowed = {"name", "detect", "answer", "code", "call", "description"}
    formats = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: format #{index + 1} is not a table of keys")
        unknown = sorted(set(entry) - allowed)
        if unknown:
            hints = ", ".join(repr(key) + did_you_mean(key, allowed) for key in unknown)
            raise UserError(f"{path}: format #{index + 1} has unknown keys {hints}; allowed: {sorted(allowed)}")
        if "name" not in entry or "detect" not in entry:
            raise UserError(f"{path}: format #{index + 1} needs 'name' and 'detect'")
        try:
            formats.append(Format(
                name=entry["name"],
                detect=re.compile(entry["detect"]),
                answer=re.compile(entry["answer"]) if "answer" in entry else None,
                code=re.compile(entry["code"]) if "code" in entry else None,
                call=entry.get("call"),
                description=entry.get("description", ""),
            ))
        except re.error as error:
            raise UserError(f"{path}: format {entry['name']!r}: bad pattern ({error})") from None
        except ValueError as error:  # Format's own checks, which name the format
            raise UserError(f"{path}: {error}") from None
        except TypeError as error:  # e.g. detect = 5
            raise UserError(f"{path}: format {entry['name']!r}: {error}") from None
    names = [f.name for f in formats]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: format names repeat: {names}")
    return tuple(formats)


def _read_format_file(path: Path):
    """The parsed TOML or YAML document; parse errors become one UserError naming the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise UserError(f"{path}: not valid TOML ({error})") from None
    import yaml  # only needed for YAML format files

    try:
        return yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as error:
        raise UserError(f"{path} line {error.problem_mark.line + 1}: not valid YAML ({error.problem})") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
