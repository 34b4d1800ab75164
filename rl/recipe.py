"""The contract between the training driver (rl.training.train) and the algorithms (rl.ppo, rl.grpo,
rl.expert_iteration), and what the algorithms share.

A run is one `Run` record: the model, its tokenizer, the rollout engine, the prompt set, the rewards, the
recorder, the settings, the seed, the step to start at, the base model (KL reference, Expert Iteration's
start), the pretraining replay and the held-out problems. Each algorithm is a *recipe* (torchtune): an object
built from the Run with a fixed lifecycle,

    recipe = Recipe(run)
    recipe.setup(state)                 # optimiser etc.; `state` is the checkpoint's trainer state on a resume
    result = recipe.step(step, batch)   # one update from one step's rollouts -> StepResult
    result = recipe.measure(step, batch)  # the same statistics without an update (the final policy)
    state = recipe.state_dict()         # what a checkpoint needs besides the weights
    recipe.close()                      # undo what setup changed on the model (e.g. the frozen router)

and the driver owns everything around it: sampling, resume, recording, checkpoints, the progress bar and
the step observers. The pieces recipes share live here too: the teacher-forced forward (`policy_forward`),
the no-update measurement (`measure_rollouts`), the frozen router, the router loss weight, the gradient
clip and the NaN guard.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from rl.config import RLSettings
from rl.distributed import Shard
from rl.engines import RolloutEngine
from rl.losses import kl_k3, token_entropy
from rl.recorder import Recorder, Rollout
from rl.replay import PretrainReplay
from rl.rollouts import PromptSet, Rewards, StepBatch, pack_batch, sampler_logprobs
from rl.routing import capture_routing
from rl.sequences import PackedBatch
from specialists.errors import UserError
from specialists.model import is_moe
from specialists.tasks import Problem

# Gradients are clipped to this global norm before every optimiser step (TRL's default, also ours).
MAX_GRAD_NORM = 1.0


@dataclass
class Run:
    """Everything one RL run trains with. `start_step` is 0, or the step of the checkpoint `model` was loaded
    from (its trainer_state.pt is read by the driver). `reference` is the pretrained base model: the KL
    reference (settings.needs_reference) and the starting point of every Expert Iteration round with start_from
    "base"; it may be None at a fresh start (a copy of `model` is taken), never on a resume. `replay` holds the
    pretraining texts when mitigations.pretrain_replay_coef > 0; `heldout` the problems of rl.evaluation
    (rl.rollouts.load_heldout_problems) when evaluation.every > 0. The caller owns (and closes) `engine`."""

    settings: RLSettings
    model: torch.nn.Module
    tokenizer: object
    engine: RolloutEngine
    prompt_set: PromptSet
    rewards: Rewards
    recorder: Recorder
    seed: int
    start_step: int = 0
    reference: torch.nn.Module | None = None
    replay: PretrainReplay | None = None
    heldout: list[Problem] = field(default_factory=list)
    progress: bool = True
    shard: Shard = field(default_factory=Shard)  # this process's place in a data-parallel run (rl.distributed)

    def base_model(self) -> torch.nn.Module:
        """The pretrained base: `reference`, or at a fresh start a frozen copy of the model before any update."""
        if self.reference is None:
            if self.start_step > 0:
                raise ValueError("a resumed run needs Run.reference (the base model), not a copy of the checkpoint")
            self.reference = copy.deepcopy(self.model)
        return self.reference


def needs_base_model(settings: RLSettings) -> bool:
    """Whether a run of these settings reads Run.reference: a KL term to it (RLSettings.needs_reference) or Expert
    Iteration rounds that start from the base model."""
    return settings.needs_reference or (settings.algorithm == "ei" and settings.expert_iteration.start_from == "base")


@dataclass
class StepResult:
    """What a recipe reports about one step's rollouts (flat completion order)."""

    logprobs: torch.Tensor  # (completions,) summed log-prob of each completion, raw distribution, model that sampled
    expert_load: torch.Tensor | None  # (completions, layers, experts) routed-token counts; None for a dense model
    metrics: dict[str, float | int | None] = field(default_factory=dict)  # keys of the metrics vocabulary


class Recipe(Protocol):
    def setup(self, state: dict | None) -> None: ...

    def step(self, step: int, batch: StepBatch) -> StepResult: ...

    def measure(self, step: int, batch: StepBatch) -> StepResult: ...

    def state_dict(self) -> dict: ...

    def close(self) -> None: ...


class StepObserver(Protocol):
    """Called by the driver after each step is recorded (live trackers, the console)."""

    def on_step(self, step: int, rollouts: list[Rollout], metrics: dict) -> None: ...


@runtime_checkable
class HeldoutObserver(Protocol):
    """A step observer that also wants the held-out evaluations (rl.evaluation): called by the driver after the
    model of `step` has been evaluated and recorded, before that step's own rollouts (live trackers)."""

    def on_heldout(self, step: int, rollouts: list[Rollout]) -> None: ...


# ---------------------------------------------------------------------------------------------
# The teacher-forced forward every algorithm runs over its rollouts
# ---------------------------------------------------------------------------------------------


@dataclass
class PolicyOutput:
    """Per completion token statistics of one teacher-forced forward, in the completion layout (B, C)."""

    logprobs: torch.Tensor  # log pi(y_t) at the sampling temperature (logits / T), differentiable
    entropy: torch.Tensor  # entropy of pi(. | x, y_<t) at the sampling temperature, differentiable
    raw_logprobs: torch.Tensor  # log pi(y_t) of the raw logits (temperature 1), detached: the rollouts' logprob
    aux_loss: torch.Tensor | None  # the router load-balancing loss over every real token (MoE, when asked for)
    hidden: torch.Tensor | None  # (B, C, H) the last hidden state before each token (PPO's value head)


def policy_forward(model, batch: PackedBatch, temperature: float, *, router_loss: bool = False,
                   hidden: bool = False, shard: Shard = Shard()) -> PolicyOutput:
    """One forward of packed prompt + completion sequences (rl.sequences.PackedBatch). The LM head runs only
    where a completion token is predicted; log-probs and entropy are those of the sampling distribution,
    logits / temperature, as TRL's GRPOTrainer computes them. The router loss is the model family's
    load-balancing loss (Switch Transformer, arXiv:2101.03961, as transformers computes it) over the real
    tokens, prompts included, exactly as on a padded batch with its attention mask; in a data-parallel run
    (`shard`) this rank's share of the loss of every rank's batch (rl.distributed)."""
    extra = {"output_router_logits": True} if router_loss else {}
    # No attention mask: packed rows, one causal mask per sequence from the restarting position ids.
    output = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **extra)
    states = output.last_hidden_state.flatten(0, 1)[batch.targets]  # (N, H): the inputs predicting completion tokens
    logits = model.get_output_embeddings()(states).float()  # (N, V)
    scaled = logits / temperature
    logprobs = torch.log_softmax(scaled, dim=-1).gather(-1, batch.tokens[:, None]).squeeze(-1)  # (N,)
    with torch.no_grad():
        raw = logprobs if temperature == 1 else torch.log_softmax(logits, -1).gather(-1, batch.tokens[:, None]).squeeze(-1)
    aux_loss = None
    if router_loss:
        config = model.config
        aux_loss = shard.load_balancing_loss(output.router_logits, config.num_experts, config.num_experts_per_tok,
                                             batch.real)
    return PolicyOutput(logprobs=batch.scatter(logprobs), entropy=batch.scatter(token_entropy(scaled)),
                        raw_logprobs=batch.scatter(raw.detach()), aux_loss=aux_loss,
                        hidden=batch.scatter(states) if hidden else None)


@torch.no_grad()
def measure_rollouts(model, tokenizer, batch: StepBatch, temperature: float, reference=None,
                     shard: Shard = Shard()) -> StepResult:
    """The statistics of a step's rollouts under the model that sampled them, without an update: routed-token
    counts, each completion's raw log-prob, the mean token entropy, the KL to `reference` (k3, when given) and
    the sampler mismatch (rl.losses.sampler_mismatch). Expert Iteration's routing pass and the final policy's
    step (no update after it) of every algorithm. The means are over every rank's tokens (`shard`)."""
    device = next(model.parameters()).device
    packed = pack_batch(batch, tokenizer).to(device)
    mask = packed.mask
    with capture_routing(model, packed.owner, mask.shape[0]) as routing:
        forward = policy_forward(model, packed, temperature)
    metrics = {"entropy": shard.masked_mean(forward.entropy, mask).item()}
    if reference is not None:
        ref = policy_forward(reference, packed, temperature).logprobs
        metrics["kl_to_reference"] = shard.masked_mean(kl_k3(forward.logprobs, ref), mask).item()
    metrics["sampler_kl"], metrics["sampler_ratio_max"] = shard.sampler_mismatch(
        forward.logprobs, sampler_logprobs(batch, mask), mask)
    return StepResult((forward.raw_logprobs * mask).sum(-1), routing[0] if routing else None, metrics)


# ---------------------------------------------------------------------------------------------
# Shared by the updates
# ---------------------------------------------------------------------------------------------


def frozen(model):
    """`model` in eval mode without gradients (a reference that is read, never trained)."""
    model.eval()
    return model.requires_grad_(False)


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


def pretrain_replay(run: Run) -> PretrainReplay | None:
    """The replay a recipe adds to its loss: Run.replay when mitigations.pretrain_replay_coef > 0, else None."""
    if run.settings.mitigations.pretrain_replay_coef <= 0:
        return None
    if run.replay is None:
        raise ValueError("mitigations.pretrain_replay_coef > 0 needs Run.replay (the pretraining texts, rl.replay)")
    return run.replay


class NonFiniteError(UserError):
    """A reward, loss or gradient norm turned NaN or infinite. Raised before the value reaches the weights, so
    the last checkpoint on disk is the last good model; the pipeline names it."""


def require_finite(name: str, value: torch.Tensor, step: int) -> None:
    """Raise NonFiniteError unless every entry of `value` is finite. Called on the step's rewards before the
    update, on each loss before backward and on each gradient norm before the optimiser step."""
    value = value.detach()
    bad = ~torch.isfinite(value)
    if bad.any():
        example = value[bad].flatten()[0].item()
        raise NonFiniteError(f"step {step}: the {name} is {example} ({int(bad.sum())} of {value.numel()} values)")


def mean_metrics(updates: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Per-key mean over a step's updates; None where an update did not compute the key."""
    keys = {key for update in updates for key in update}
    means = {}
    for key in keys:
        values = [update[key] for update in updates if update.get(key) is not None]
        means[key] = sum(values) / len(values) if values else None
    return means
