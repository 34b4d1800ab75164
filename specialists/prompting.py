"""The one place that turns a problem into what the model sees: prompt text and prompt token ids.

Rollouts (both engines), evaluation and the teacher-forced loss all take their prompts from a `Prompter`,
so the sequence a completion was sampled after is exactly the one it is trained and scored after.

- text: the problem's fields through a format string (`[rl] prompt_template`, by default the built-in
  "Question: {question}\\nAnswer:\\n" the built-in models are pretrained on), optionally wrapped as the
  user turn of the tokenizer's own chat template (`[rl] chat_template = true`, with the generation prompt
  appended). Special tokens are spelled out in the text: a tokenizer that starts every sequence with a
  beginning-of-text token (Llama's) gets it written in front, as its chat template would.
- token ids: the text tokenised with `add_special_tokens=False`, so the ids are those of the text and
  nothing is added twice.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, fields

from specialists.tasks import PROMPT_TEMPLATE, Problem, prompt_text

# Problem fields a template may use; `answer` and `reference_solution` would hand the model the answer.
TEMPLATE_FIELDS = tuple(f.name for f in fields(Problem) if f.name not in ("answer", "reference_solution"))


def template_problem(template: str) -> str | None:
    """Why `template` cannot be a prompt template (a sentence), or None when it can: it must be a valid
    format string over TEMPLATE_FIELDS that uses {question}."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        return f"not a valid format string ({error})"
    unknown = sorted(names - set(TEMPLATE_FIELDS))
    if unknown:
        return f"unknown fields {unknown}; allowed: {list(TEMPLATE_FIELDS)}"
    if "question" not in names:
        return "it must contain {question}"
    return None


@dataclass(frozen=True)
class Prompter:
    """Problem -> prompt text and token ids for one tokenizer (see the module docstring)."""

    tokenizer: object  # a transformers tokenizer
    template: str = PROMPT_TEMPLATE
    chat: bool = False

    def text(self, problem: Problem) -> str:
        message = prompt_text(problem, self.template)
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                      add_generation_prompt=True)
        return self._beginning_of_text() + message

    def token_ids(self, problem: Problem) -> list[int]:
        return self.tokenizer(self.text(problem), add_special_tokens=False)["input_ids"]

    def _beginning_of_text(self) -> str:
        """The beginning-of-text token when the tokenizer puts one before every sequence, else ""."""
        bos = self.tokenizer.bos_token_id
        added = self.tokenizer("", add_special_tokens=True)["input_ids"]
        return self.tokenizer.bos_token if bos is not None and added[:1] == [bos] else ""
