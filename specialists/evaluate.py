"""Evaluate a pretrained model: which formats it samples, and how accurate each one is.

Sampling is plain ancestral sampling at the configured temperature (1.0 by default, top-k and
top-p off), one completion per held-out problem, with transformers `generate`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specialists.config import SpecialistsConfig
from specialists.formats import FORMAT_SETS, OTHER
from specialists.grading import grade_completions
from specialists.model import load_model
from specialists.sandbox import Sandbox
from specialists.prompting import Prompter
from specialists.tasks import generate_problems
from specialists.tokenizer import load_tokenizer

BATCH_SIZE = 64


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], temperature: float, max_new_tokens: int,
                       seed: int, progress: bool = True) -> list[str]:
    """One completion per prompt text (a `Prompter`'s: special tokens written out, so none are added here)."""
    torch.manual_seed(seed)
    completions = []
    for begin in tqdm(range(0, len(prompts), BATCH_SIZE), desc="sample", disable=not progress):
        batch = tokenizer(prompts[begin:begin + BATCH_SIZE], return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **sampling)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return completions


def evaluate(model_dir: str | Path, config: SpecialistsConfig, out_file: str | Path | None = None,
             progress: bool = True) -> dict:
    """Per-format share of sampled generations and per-format accuracy on held-out problems."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    model.eval()
    settings = config.evaluation
    problems = generate_problems(settings.num_problems, config.seed, "eval", config.task)
    prompter = Prompter(tokenizer)  # the built-in template the base was pretrained on
    completions = sample_completions(model, tokenizer, [prompter.text(p) for p in problems], settings.temperature,
                                     settings.max_new_tokens, config.seed, progress)
    formats = FORMAT_SETS["synthetic"]
    with Sandbox() as sandbox:
        grades = grade_completions(completions, [p.answer for p in problems], formats, sandbox)
    names = [f.name for f in formats] + [OTHER]
    counts = Counter(g.format for g in grades)
    correct = Counter(g.format for g in grades if g.correct)
    result = {
        "num_samples": len(grades),
        "temperature": settings.temperature,
        "accuracy": sum(g.correct for g in grades) / len(grades),
        "format_share": {name: counts[name] / len(grades) for name in names},
        "format_accuracy": {name: (correct[name] / counts[name] if counts[name] else None) for name in names},
        "reasons": dict(sorted(Counter(g.reason for g in grades).items())),
        "examples": {name: next((c for c, g in zip(completions, grades) if g.format == name), None) for name in names},
    }
    if out_file is not None:
        Path(out_file).write_text(json.dumps(result, indent=2) + "\n")
    return result
