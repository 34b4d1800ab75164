"""Where in a completion does the RL policy differ from its base? Exact per-position KL on a run's samples.

For the rollouts of one recorded step (default: the last), teacher-forces each prompt + completion through
the run's final checkpoint (pi) and the pretrained base (pi_ref) and computes the exact KL over the
vocabulary at every completion position t:

    KL_t = sum_v pi(v | x, y_<t) (log pi(v | x, y_<t) - log pi_ref(v | x, y_<t))

i.e. the quantity GRPO's k3 term estimates per token (Schulman 2020, "Approximating KL divergence"), and
prints one JSON line: the mean KL per token, the mean KL summed over a sequence, and the share of that sum
at the first `--first` positions (where a completion commits to its format). Completions are re-tokenised
from their text (the run directory keeps text, not token ids).

    python experiments/studies/echo_chamber/token_kl.py RUN_DIR [--step N] [--first 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch


def position_kl(model, ref_model, tokenizer, prompts: list[str], completions: list[str]) -> list[torch.Tensor]:
    """Exact KL(pi || pi_ref) at each completion position, one tensor per completion."""
    result = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            if not completion_ids:
                continue
            ids = torch.tensor([prompt_ids + completion_ids])
            # logits at position i predict token i + 1: the completion's tokens are predicted from len(prompt) - 1
            span = slice(len(prompt_ids) - 1, len(prompt_ids) + len(completion_ids) - 1)
            log_p = torch.log_softmax(model(ids).logits[0, span].float(), dim=-1)
            log_q = torch.log_softmax(ref_model(ids).logits[0, span].float(), dim=-1)
            result.append((log_p.exp() * (log_p - log_q)).sum(-1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, help="rollout step (default: the last recorded)")
    parser.add_argument("--first", type=int, default=3, help="positions counted as the format decision")
    args = parser.parse_args()

    from experiments.config import ExperimentConfig
    from experiments.pipeline import base_model_dir
    from specialists.model import load_model
    from specialists.tokenizer import load_tokenizer

    config = ExperimentConfig.model_validate(json.loads((args.run_dir / "config.json").read_text()))
    checkpoints = sorted((args.run_dir / "checkpoints").glob("step_*"))
    files = sorted((args.run_dir / "rollouts").glob("step_*.parquet"))
    step = args.step if args.step is not None else int(files[-1].stem.split("_")[1])
    rows = pd.read_parquet(args.run_dir / "rollouts" / f"step_{step:06d}.parquet")
    base = base_model_dir(config.specialists(), progress=False)
    model, ref_model = load_model(checkpoints[-1]).eval(), load_model(base).eval()
    per_position = position_kl(model, ref_model, load_tokenizer(base), list(rows["prompt"]), list(rows["completion"]))
    sums = torch.stack([kl.sum() for kl in per_position])
    first = torch.stack([kl[:args.first].sum() for kl in per_position])
    print(json.dumps({
        "run": args.run_dir.name, "checkpoint": checkpoints[-1].name, "rollout_step": step,
        "completions": len(per_position),
        "kl_per_token": round(float(torch.cat(per_position).mean()), 4),
        "kl_per_sequence": round(float(sums.mean()), 3),
        f"share_in_first_{args.first}_tokens": round(float(first.sum() / sums.sum()), 3),
        "mean_tokens": round(sum(len(kl) for kl in per_position) / len(per_position), 1),
    }))


if __name__ == "__main__":
    main()
