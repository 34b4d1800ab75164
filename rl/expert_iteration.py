"""Expert Iteration, as run in the Echo Chamber paper (Zhao et al. 2025, arXiv:2504.07912).

Each round (one recorded step) does, with k = sampling.samples_per_prompt:

 1. sample     k completions per prompt of prompt_set.batch(step) from the current model, grade and
               reward them (rl.rollouts.collect; rl.training.train does this step and 5-6);
 2. route      a teacher-forced forward of those completions under the model that sampled them, without
               gradient (rl.recipe.measure_rollouts): the recorder's expert_load and log-probs;
 3. filter     keep the correct completions (grade.correct), then deduplicate them by completion
               text per prompt, first sample kept (`select_for_sft`);
 4. fine-tune  start from the base model (expert_iteration.start_from = "base", the paper's choice)
               or from the latest model ("latest"), and minimise the negative log-likelihood of the kept completions given their prompts,
                   L_SFT = - sum_{i,t} log pi(y_it | x_i, y_i,<t) / sum_i |y_i|   (completion tokens only),
               plus aux_coef * L_aux (router load balancing) for an MoE, for expert_iteration.sft_epochs
               epochs in minibatches of SFT_BATCH_SIZE, with a fresh AdamW (constant lr, no decay);
 5. sync       engine.sync_weights(model), so the next round samples from the fine-tuned model;
 6. record     rollouts and metrics; a checkpoint every `checkpoint_every` rounds and after the last.

A round with no correct sample fine-tunes on nothing: the model is the base model again ("base") or
unchanged ("latest"). The data of a round are that round's samples only; nothing accumulates.
Mitigations: only freeze_router (and format_diversity_coef, which changes the recorded reward but not
what is kept); the rest act on policy-gradient losses that EI does not have, and neither a KL term nor
pretraining replay applies (EI's update is already supervised): the config refuses them when it is loaded.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from rl.config import RLSettings
from rl.engines import Completion
from rl.losses import masked_mean
from rl.recipe import (
    MAX_GRAD_NORM,
    Run,
    StepResult,
    aux_loss_coefficient,
    frozen_router,
    mean_metrics,
    measure_rollouts,
    policy_forward,
    require_finite,
)
from rl.rollouts import StepBatch
from rl.seeds import step_seed
from rl.sequences import pack_rows

SFT_BATCH_SIZE = 16


def select_for_sft(batch: StepBatch) -> tuple[int, list[tuple[str, Completion]]]:
    """(number of correct samples, the correct (prompt text, completion) pairs deduplicated by completion text
    per prompt).

    Order is kept (prompt by prompt, sample by sample) and the first of equal texts survives.
    Two prompts with the same id count as one prompt (a prompt set smaller than a step's batch).
    """
    correct, seen, unique = 0, set(), []
    for problem, prompt, group, grades in zip(batch.problems, batch.prompts, batch.completions, batch.grades):
        for completion, grade in zip(group, grades):
            if not grade.correct:
                continue
            correct += 1
            key = (problem.id, completion.text)
            if key not in seen:
                seen.add(key)
                unique.append((prompt, completion))
    return correct, unique


def supervised_finetune(model, tokenizer, samples: list[tuple[str, Completion]], settings: RLSettings,
                        seed: int, step: int) -> list[dict]:
    """Step 4 of round `step`: fine-tune `model` in place on prompt + completion, loss on completion tokens
    only, minibatches drawn with `seed`. Returns one {"loss", "grad_norm", "aux_loss"} per optimiser step."""
    if not samples:
        return []
    device = next(model.parameters()).device
    prompt_ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt, _ in samples]  # as pack_batch
    completion_ids = [list(completion.token_ids) for _, completion in samples]
    aux_coef = aux_loss_coefficient(model, settings)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    updates = []
    for _ in range(settings.expert_iteration.sft_epochs):
        for rows in torch.randperm(len(samples), generator=generator).split(SFT_BATCH_SIZE):
            minibatch = pack_rows([prompt_ids[i] for i in rows], [completion_ids[i] for i in rows],
                                  tokenizer.pad_token_id).to(device)
            forward = policy_forward(model, minibatch, temperature=1.0, router_loss=aux_coef > 0)
            # Negative log-likelihood per completion token, mean over the minibatch's completion tokens.
            nll = -masked_mean(forward.logprobs, minibatch.mask)
            loss = nll + aux_coef * forward.aux_loss if aux_coef > 0 else nll
            require_finite("loss", loss, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            require_finite("gradient norm", grad_norm, step)
            optimizer.step()
            updates.append({"loss": nll.item(), "grad_norm": grad_norm.item(),
                            "aux_loss": forward.aux_loss.item() if aux_coef > 0 else None})
    return updates


class ExpertIteration:
    """The Expert Iteration recipe (rl.recipe.Recipe). Its trainer state is empty: each round builds its own
    optimiser, and with start_from "base" starts from the base model's weights."""

    def __init__(self, run: Run):
        self.run = run

    def setup(self, state: dict | None) -> None:
        run = self.run
        self._exit = ExitStack()
        self._exit.enter_context(frozen_router(run.model, run.settings.mitigations.freeze_router))
        self.base = run.base_model() if run.settings.expert_iteration.start_from == "base" else None

    def step(self, step: int, batch: StepBatch) -> StepResult:
        run, settings = self.run, self.run.settings
        # 2. Routing and log-probs under the model that sampled.
        result = self.measure(step, batch)
        # 3. Keep the correct samples, deduplicated per prompt.
        kept, samples = select_for_sft(batch)
        # 4. Fine-tune from the base (reset in place, so the engine's handle stays valid) or the latest model.
        if self.base is not None:
            run.model.load_state_dict(self.base.state_dict())
        updates = supervised_finetune(run.model, run.tokenizer, samples, settings, step_seed(run.seed, step, "sft"), step)
        result.metrics.update(mean_metrics(updates), updates=len(updates), sampled=len(batch.flat_completions),
                              kept=kept, kept_unique=len(samples))
        return result

    def measure(self, step: int, batch: StepBatch) -> StepResult:
        return measure_rollouts(self.run.model, self.run.tokenizer, batch, self.run.settings.sampling.temperature or 1.0)

    def state_dict(self) -> dict:
        return {}

    def close(self) -> None:
        self._exit.close()
