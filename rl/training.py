"""What PPO, GRPO and Expert Iteration share around their training loops.

Each algorithm's file holds only that algorithm (rl/ppo.py, rl/grpo.py, rl/expert_iteration.py); the
pieces they all need live here, so that no algorithm imports another and a rule (which mitigations are
refused, how a run resumes, which model is the KL reference) is written once:

- `check_mitigations`: refuse a mitigation switch the algorithm does not implement;
- `kl_reference` / `frozen`: the frozen reference model of the KL term;
- `start_or_resume`: the entry checks, and on a resume the checkpoint's trainer state;
- `rng_state` / `restore_rng_state`: the RNG state a checkpoint carries;
- `frozen_router`: mitigations.freeze_router for the duration of a run;
- `aux_loss_coefficient`, `MAX_GRAD_NORM`: the router load-balancing weight and the gradient clip of
  our own loops (PPO, EI; GRPO gets the same values through TRL's config);
- `require_finite`: stop the run when a reward, loss or gradient norm turns NaN or infinite.

The per-step rollout work (prompts, sampling, rewards, recording) is in rl.rollouts; the loss math in
rl.losses.
"""

from __future__ import annotations

import copy
import random
from contextlib import contextmanager

import torch

from rl.config import RLSettings
from rl.recorder import Recorder
from specialists.errors import UserError
from specialists.model import is_moe

# Gradients are clipped to this global norm before every optimiser step (TRL's default, also ours).
MAX_GRAD_NORM = 1.0

# Settings that only tune a switch; they are never refused on their own.
MITIGATION_PARAMETERS = {"cov_ratio", "kl_cov_coef", "pretrain_replay_batch"}


def check_mitigations(settings: RLSettings, supported: set[str], algorithm: str) -> None:
    """Refuse mitigation switches an algorithm does not implement, rather than silently ignoring them
    (a switch added to MitigationSettings later is refused until an algorithm supports it)."""
    defaults = type(settings.mitigations)()
    unsupported = [name for name in type(settings.mitigations).model_fields
                   if name not in supported | MITIGATION_PARAMETERS
                   and getattr(settings.mitigations, name) != getattr(defaults, name)]
    if unsupported:
        raise UserError(f"{algorithm} does not implement mitigations {unsupported}; "
                        f"it supports {sorted(supported)}")


def frozen(model):
    """`model` in eval mode without gradients (a reference that is read, never trained)."""
    model.eval()
    return model.requires_grad_(False)


def kl_reference(model, ref_model, settings: RLSettings, start_step: int, algorithm: str):
    """The KL reference of PPO and GRPO: None with beta = 0, else `ref_model` (the base model) frozen, or a
    frozen copy of `model` at a fresh start. A resumed run must pass the base model: a copy of the
    checkpoint would be the wrong reference. Call before `start_or_resume`, which forgets records."""
    if settings.beta <= 0:
        return None
    if ref_model is None:
        if start_step > 0:
            raise ValueError(f"resuming {algorithm} with beta > 0 needs ref_model (the base model), "
                             "not a copy of the checkpoint")
        ref_model = copy.deepcopy(model)
    return frozen(ref_model)


def start_or_resume(algorithm: str, settings: RLSettings, recorder: Recorder, start_step: int,
                    trainer_state: dict | None) -> dict | None:
    """Checks shared by the entry points. Forgets what was recorded at start_step or later (a run killed
    before its first checkpoint restarts at 0 and may have left step 0 behind); on a resume (start_step > 0)
    returns the checkpoint's trainer state (read from its trainer_state.pt unless given)."""
    if settings.algorithm != algorithm:
        raise ValueError(f"this trainer runs {algorithm!r}, but settings.algorithm is {settings.algorithm!r}")
    if not 0 <= start_step <= settings.steps:
        raise ValueError(f"start_step must be in [0, {settings.steps}], got {start_step}")
    recorder.forget_from(start_step)
    if start_step == 0:
        return trainer_state
    if trainer_state is None:
        path = recorder.checkpoint_dir(start_step) / "trainer_state.pt"
        if not path.exists():
            raise UserError(f"cannot resume at step {start_step}: {path} is missing")
        trainer_state = torch.load(path, map_location="cpu", weights_only=True)
    if trainer_state.get("algorithm") != algorithm or trainer_state.get("step") != start_step:
        raise UserError(f"trainer state of {trainer_state.get('algorithm')!r} step {trainer_state.get('step')} "
                        f"cannot resume {algorithm!r} at step {start_step}")
    return trainer_state


def rng_state() -> dict:
    """The global RNG state a checkpoint stores, so that a resumed run draws what the uninterrupted one did."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


@contextmanager
def frozen_router(model, enabled: bool):
    """mitigations.freeze_router: while the block runs, every MoE router (`mlp.gate`) weight that had
    requires_grad has it off, so the routing stays as pretrained (build optimisers inside the block);
    afterwards they train again. Does nothing when not `enabled` (or for a dense model)."""
    routers = [p for name, p in model.named_parameters() if name.endswith("mlp.gate.weight") and p.requires_grad]
    routers = routers if enabled else []
    for parameter in routers:
        parameter.requires_grad_(False)
    try:
        yield routers
    finally:
        for parameter in routers:
            parameter.requires_grad_(True)


def aux_loss_coefficient(model, settings: RLSettings) -> float:
    """Weight of the router load-balancing loss: the setting, else the model's own; 0 for dense models."""
    if not is_moe(model):
        return 0.0
    if settings.router_aux_loss_coef is not None:
        return settings.router_aux_loss_coef
    return float(model.config.router_aux_loss_coef)


class NonFiniteError(UserError):
    """A reward, loss or gradient norm turned NaN or infinite. Raised before the value reaches the weights, so
    the last checkpoint on disk is the last good model; the pipeline names it."""


def require_finite(name: str, value: torch.Tensor, step: int) -> None:
    """Raise NonFiniteError unless every entry of `value` is finite. Called on the step's rewards before the
    update and on each loss before backward (and on PPO/EI gradient norms before the optimiser step)."""
    value = value.detach()
    bad = ~torch.isfinite(value)
    if bad.any():
        example = value[bad].flatten()[0].item()
        raise NonFiniteError(f"step {step}: the {name} is {example} ({int(bad.sum())} of {value.numel()} values)")
