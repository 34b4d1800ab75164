"""One entry point for the three algorithms (they share engines, rewards and the recorder)."""

from __future__ import annotations

from pathlib import Path

from rl.config import RLSettings
from specialists.errors import UserError


def train(settings: RLSettings, *, model, tokenizer, engine, prompt_set, rewards, recorder, seed: int,
          base_model_dir: str | Path, start_step: int = 0, progress: bool = True,
          replay_texts: list[str] | None = None):
    """Run `settings.algorithm` from `start_step` (0, or the step of the checkpoint `model` was loaded from).

    `replay_texts`: the pretraining corpus (e.g. `[e.text for e in specialists.pretrain.build_corpus(config)]`),
    needed by mitigations.pretrain_replay_coef > 0 (PPO and GRPO; rl.replay) and ignored otherwise.
    """
    from specialists.model import load_model

    if settings.algorithm == "grpo":
        from rl.grpo import train_grpo as algorithm
    elif settings.algorithm == "ppo":
        from rl.ppo import train_ppo as algorithm
    else:
        from rl.expert_iteration import train_expert_iteration as algorithm
    options = {}
    if settings.mitigations.pretrain_replay_coef > 0 and settings.algorithm != "ei":  # EI refuses it itself
        from rl.replay import PretrainReplay

        if not replay_texts:
            raise UserError("rl.mitigations.pretrain_replay_coef > 0 needs the pretraining texts (replay_texts)")
        options["replay"] = PretrainReplay.from_texts(replay_texts, tokenizer,
                                                      settings.mitigations.pretrain_replay_batch, seed)
    # The reference (KL) or base (EI from base) model is always the pretrained checkpoint, also on resume.
    needs_base = settings.beta > 0 or settings.algorithm == "ei"
    ref_model = load_model(base_model_dir) if needs_base else None
    return algorithm(model, tokenizer, engine, prompt_set, rewards, settings, recorder, seed, start_step, progress,
                     ref_model=ref_model, **options)
