"""Evaluate a pretrained model: which formats it samples, how accurate each one is, and (MoE) where each format's
tokens are routed.

Sampling is plain ancestral sampling at the configured temperature (1.0 by default, top-k and
top-p off), one completion per held-out problem, with transformers `generate`. Completions are classified
and graded with the mixture's format set (`mixture.format_set`).

Routing (MoE bases): one teacher-forced forward over each prompt + completion, the top-k experts of each
completion token read off the router logits (`output_router_logits`), as the RL recorder counts `expert_load`.
    format_expert_affinity[layer][format][e] = P(expert e | format) = tokens of format f routed to e / all
        routed (token, expert) pairs of format f  (rows sum to 1; uniform routing gives 1 / num_experts)
    expert_top_format[layer][e] = argmax_f P(e | f): the format whose tokens go to e most readily (independent
        of how often each format was sampled)
A BTX base's checkpoint names each expert's specialist (`expert_specialists` in its config.json); then also
    specialist_alignment[format][layer] = sum over f's specialist's experts e of P(e | f): how much of format
        f's routing goes to its own specialist (chance: that specialist's share of the experts, 1 / formats)
    experts_still_specialists[layer][e] = expert_top_format == the format of e's specialist
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specialists.config import SpecialistsConfig
from specialists.formats import OTHER, load_formats
from specialists.grading import grade_completions
from specialists.model import is_moe, load_model
from specialists.sandbox import Sandbox
from specialists.prompting import Prompter
from specialists.tasks import PROMPT_TEMPLATE, Problem, generate_problems
from specialists.tokenizer import load_tokenizer

BATCH_SIZE = 64


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], temperature: float, max_new_tokens: int,
                       seed: int, progress: bool = True) -> list[list[int]]:
    """The sampled completion of each prompt text (a `Prompter`'s: special tokens written out, so none are added
    here) as token ids, up to and including its end-of-text token."""
    torch.manual_seed(seed)
    completions = []
    for begin in tqdm(range(0, len(prompts), BATCH_SIZE), desc="sample", disable=not progress):
        batch = tokenizer(prompts[begin:begin + BATCH_SIZE], return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **sampling)
        for row in output[:, batch["input_ids"].shape[1]:].tolist():  # generate pads finished rows after their EOS
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            completions.append(row[:end])
    return completions


@torch.no_grad()
def routed_tokens(model, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
    """(completions, layers, experts): how many of each completion's tokens each layer routed to each expert
    (top-k of the router logits in a teacher-forced forward over prompt + completion, right-padded)."""
    top_k, experts = model.config.num_experts_per_tok, model.config.num_experts
    counts = []
    for begin in range(0, len(prompt_ids), BATCH_SIZE):
        rows = [p + c for p, c in zip(prompt_ids[begin:begin + BATCH_SIZE], completion_ids[begin:begin + BATCH_SIZE])]
        width = max(len(row) for row in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (batch, width)
        completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, (row, prompt) in enumerate(zip(rows, prompt_ids[begin:begin + BATCH_SIZE])):
            input_ids[index, :len(row)] = torch.tensor(row)
            attention_mask[index, :len(row)] = 1
            completion_mask[index, len(prompt):len(row)] = 1
        output = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        per_layer = []
        for logits in output.router_logits:  # (batch * width, experts) per layer
            chosen = logits.topk(top_k, dim=-1).indices.reshape(len(rows), width, top_k)
            one_hot = torch.nn.functional.one_hot(chosen, experts).sum(dim=2)  # (batch, width, experts)
            per_layer.append((one_hot * completion_mask[..., None]).sum(dim=1))  # (batch, experts)
        counts.append(torch.stack(per_layer, dim=1))  # (batch, layers, experts)
    return torch.cat(counts)


def routing_affinity(counts: torch.Tensor, formats: list[str], names: list[str],
                     specialists: list[str] | None) -> dict:
    """The module docstring's routing entries from `routed_tokens` counts and each completion's format."""
    layers, experts = counts.shape[1], counts.shape[2]
    by_format = {name: counts[[i for i, f in enumerate(formats) if f == name]].sum(dim=0).double() for name in names}
    affinity = {name: total / total.sum(dim=1, keepdim=True) for name, total in by_format.items() if total.sum() > 0}
    top = [[max(affinity, key=lambda name: affinity[name][layer, e].item()) for e in range(experts)]
           for layer in range(layers)]
    result = {"format_expert_affinity": {str(layer): {name: rows[layer].tolist() for name, rows in affinity.items()}
                                         for layer in range(layers)},
              "expert_top_format": {str(layer): top[layer] for layer in range(layers)}}
    if specialists is not None:
        result["expert_specialists"] = specialists
        result["specialist_alignment"] = {
            name: {str(layer): sum(rows[layer, e].item() for e in range(experts) if specialists[e] == name)
                   for layer in range(layers)}
            for name, rows in affinity.items() if name in specialists}
        result["experts_still_specialists"] = {str(layer): [top[layer][e] == specialists[e] for e in range(experts)]
                                               for layer in range(layers)}
    return result


def evaluate(model_dir: str | Path, config: SpecialistsConfig, out_file: str | Path | None = None,
             progress: bool = True, heldout: list[Problem] | None = None, prompt_template: str = PROMPT_TEMPLATE,
             chat_template: bool = False) -> dict:
    """Per-format share of sampled generations and per-format accuracy on held-out problems: the first
    `evaluation.num_problems` of `heldout` (a prompt file's held-out split, specialists.prompt_data), or
    without it the synthetic task's evaluation split; for an MoE, where each format's completion tokens are
    routed (module docstring). Prompts are made as RL makes them (`specialists.prompting.Prompter`):
    `prompt_template` and `chat_template` are a run's `[rl]` settings (the defaults: the built-in template the
    built-in models are pretrained on)."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    model.eval()
    settings = config.evaluation
    if heldout is None:
        problems = generate_problems(settings.num_problems, config.seed, "eval", config.task)
    else:
        problems = heldout[:settings.num_problems]
    prompter = Prompter(tokenizer, prompt_template, chat_template)
    prompts = [prompter.text(p) for p in problems]
    completion_ids = sample_completions(model, tokenizer, prompts, settings.temperature, settings.max_new_tokens,
                                        config.seed, progress)
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    formats = load_formats(config.mixture.format_set)
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
    if is_moe(model):
        prompt_ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
        result.update(routing_affinity(routed_tokens(model, prompt_ids, completion_ids), [g.format for g in grades],
                                       names, getattr(model.config, "expert_specialists", None)))
    if out_file is not None:
        Path(out_file).write_text(json.dumps(result, indent=2) + "\n")
    return result
