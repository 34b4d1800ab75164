"""Where a Branch-Train-MiX base loses its specialists' skill (study question 7).

Per format f, the mean token loss of the solution (the prompt given) on held-out problems of f (the task's eval
split, rendered in f as pretraining renders it, with the config's difficulty) for:

1. specialist f alone (the dense model BTX branched and trained on f, saved in the base's `specialists/f`);
2. specialist f with every weight outside its MLP (attention, norms, embeddings, head) replaced by the mean over
   the specialists: what the merged MoE computes when all of f's tokens are routed to f's own experts with equal
   weights (oracle routing; specialists/btx.py explains why chunked experts then give back the whole MLP);
3. the BTX base: the merged MoE after the mix phase (its routers, or with `mix_train = "all"` all its weights,
   trained on the mixture);
4. with `--joint CONFIG`, that config's base (the jointly trained MoE of the same shape), for reference.

1 -> 2 is the cost of averaging, 2 -> 3 what the learned routing (and a whole-model mix phase) changes.

    python experiments/studies/echo_chamber/btx_oracle.py BTX_CONFIG.toml [--joint CONFIG.toml] [--problems 64]

Bases come from the pretraining cache (pretrained on first use, as `echolab run` does).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch


def solution_loss(model, tokenizer, texts: list[tuple[str, str]]) -> float:
    """Mean next-token cross-entropy (nats) over the solution tokens of (prompt, solution) pairs."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, solution in texts:
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = prompt_ids + tokenizer(solution, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0, len(prompt_ids) - 1:-1]  # (solution tokens, vocab)
            target = torch.tensor(ids[len(prompt_ids):])
            total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += len(target)
    return total / count


def with_averaged_rest(specialist, specialists):
    """`specialist` with every parameter outside its MLP replaced as the merge replaces it (`btx.averaged`)."""
    from specialists import btx

    model = copy.deepcopy(specialist)
    states = [dict(other.named_parameters()) for other in specialists]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".mlp." not in name:
                parameter.copy_(btx.averaged(states, name))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment TOML whose model.kind is 'btx'")
    parser.add_argument("--joint", help="experiment TOML of a base to compare with (e.g. the joint MoE)")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7, help="seed of the held-out problems")
    args = parser.parse_args()

    from experiments.config import load_experiment_config
    from experiments.pipeline import base_model
    from specialists.formats import FORMAT_SETS
    from specialists.model import load_model
    from specialists.tasks import generate_problems, prompt_text
    from specialists.tokenizer import END_OF_TEXT, load_tokenizer

    config = load_experiment_config(args.config)
    if config.model.kind != "btx":
        raise SystemExit(f"{args.config}: model.kind is {config.model.kind!r}, not 'btx'")
    base = base_model(config)
    tokenizer = load_tokenizer(base)
    formats = sorted(config.mixture.formats)  # the specialists' order (specialists.config.expert_specialists)
    renderers = {f.name: f for f in FORMAT_SETS["synthetic"]}
    problems = generate_problems(args.problems, args.seed, "eval", config.task)
    texts = {name: [(prompt_text(p), renderers[name].render(p, config.mixture.formats[name].difficulty) + END_OF_TEXT)
                    for p in problems] for name in formats}
    specialists = {name: load_model(base.parent / "specialists" / name) for name in formats}
    merged = load_model(base)
    references = []  # (model, its own tokenizer): a base pretrained on another corpus has another tokenizer
    if args.joint:
        joint = base_model(load_experiment_config(args.joint))
        references.append((load_model(joint), load_tokenizer(joint)))
    columns = ["specialist alone", "specialist, averaged rest (oracle routing)", "BTX MoE (after the mix phase)"]
    columns += ["joint base"] * len(references)
    print("| format | " + " | ".join(columns) + " |")
    print("|" + " --- |" * (len(columns) + 1))
    for name in formats:
        models = [specialists[name], with_averaged_rest(specialists[name], list(specialists.values())), merged]
        pairs = [(model, tokenizer) for model in models] + references
        losses = [solution_loss(model, model_tokenizer, texts[name]) for model, model_tokenizer in pairs]
        print(f"| {name} | " + " | ".join(f"{value:.3f}" for value in losses) + " |", flush=True)


if __name__ == "__main__":
    main()
