"""Our GRPO loss (rl.grpo.grpo_loss) against stock TRL GRPOTrainer's, on the same batch and the same weights.

TRL is the reference: a stock `trl.GRPOTrainer` is built on a copy of the tiny MoE and its public
`compute_loss(model, inputs)` is called on inputs in TRL's documented layout (left-padded prompts,
right-padded completions, per-completion advantages, per-token old and reference log-probs); our loss gets
the same data in our layout (right-padded prompt + completion rows). For each loss type and both
importance-sampling levels (token; GSPO's sequence) the losses and the gradients of every parameter agree to
a relative error of 1e-5, with every term TRL and we share switched on at once: temperature, clip-higher,
the k3 KL with its importance-ratio weighting, the entropy bonus and the router load-balancing loss.

Our loop's layout differs from TRL's (sequences packed into rows without padding, the LM head only where
completion tokens are predicted), so the parity also covers it. The batch is real: completions sampled from
the model (some cut at max_new_tokens, some ended), group
advantages of uneven rewards, and old / reference log-probs that differ from the current ones by up to
+-0.5 per token (and the old ones by up to +-0.4 more per sequence), so the clip acts on both sides, at
either level, and every term is non-zero.
"""

from __future__ import annotations

import pytest
import torch

from rl.config import GRPOSettings, MitigationSettings, RLSettings, SamplingSettings
from rl.engines import HFEngine
from rl.grpo import PolicyBatch, grpo_loss
from rl.losses import group_advantages, masked_mean
from rl.recipe import aux_loss_coefficient, policy_forward
from rl.sequences import pack_rows
from specialists.model import load_model
from specialists.tasks import generate_problems, prompt_text
from specialists.tokenizer import load_tokenizer

trl = pytest.importorskip("trl")

pytestmark = pytest.mark.integration

PROMPTS, SAMPLES, MAX_NEW_TOKENS, TEMPERATURE = 3, 4, 16, 0.9
BETA, ENTROPY_COEF, EPSILON, EPSILON_HIGH = 0.04, 0.01, 0.2, 0.28
RELATIVE_ERROR = 1e-5


def settings_for(loss_type: str, level: str) -> RLSettings:
    return RLSettings(beta=BETA, epsilon=EPSILON, epsilon_high=EPSILON_HIGH,
                      sampling=SamplingSettings(temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS,
                                                samples_per_prompt=SAMPLES),
                      # two passes per batch, as clip-higher needs; grpo_loss computes one pass on the batch given
                      grpo=GRPOSettings(loss_type=loss_type, importance_sampling_level=level, num_iterations=2),
                      mitigations=MitigationSettings(entropy_coef=ENTROPY_COEF))


@pytest.fixture(scope="module")
def batch(tiny_moe_dir):
    return make_batch(tiny_moe_dir)


def make_batch(model_dir) -> dict:
    """Prompt and completion token ids, advantages and per-token old / reference log-probs of every completion."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    problems = generate_problems(PROMPTS, 3, "train")
    sampling = SamplingSettings(temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS, samples_per_prompt=SAMPLES)
    groups = HFEngine(model, tokenizer).generate([prompt_text(p) for p in problems], sampling, seed=5)
    prompt_ids = [tokenizer(prompt_text(p), add_special_tokens=False)["input_ids"] for p in problems for _ in range(SAMPLES)]
    completion_ids = [c.token_ids for group in groups for c in group]
    lengths = [len(ids) for ids in completion_ids]
    assert len(set(lengths)) > 1 and max(lengths) == MAX_NEW_TOKENS  # uneven lengths, some cut, some ended

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.2, 0.9, 0.9, 0.1, 0.0, 0.0, 1.0, 0.3])
    advantages = group_advantages(rewards, SAMPLES)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the current log-probs of each completion token, shifted by up to +-0.5
        current = policy_forward(model, pack_rows(prompt_ids, completion_ids, tokenizer.pad_token_id), TEMPERATURE).logprobs
    old, ref = [], []
    for row, completion in enumerate(completion_ids):
        tokens = current[row, :len(completion)]
        shift = 0.8 * (torch.rand(1, generator=generator) - 0.5)  # moves GSPO's sequence ratio out of the clip range too
        old.append(tokens + shift + (torch.rand(len(completion), generator=generator) - 0.5))
        ref.append(tokens + (torch.rand(len(completion), generator=generator) - 0.5))
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "advantages": advantages, "old": old,
            "ref": ref, "pad": tokenizer.pad_token_id}


def trl_inputs(batch) -> dict:
    """The batch in GRPOTrainer's layout (what its `_generate_and_score_completions` returns)."""
    rows = len(batch["prompt_ids"])
    prompt_width = max(map(len, batch["prompt_ids"]))
    width = max(map(len, batch["completion_ids"]))
    inputs = {"prompt_ids": torch.full((rows, prompt_width), batch["pad"]), "prompt_mask": torch.zeros(rows, prompt_width, dtype=torch.long),
              "completion_ids": torch.full((rows, width), batch["pad"]), "completion_mask": torch.zeros(rows, width, dtype=torch.long),
              "old_per_token_logps": torch.zeros(rows, width), "ref_per_token_logps": torch.zeros(rows, width)}
    for row, (prompt, completion) in enumerate(zip(batch["prompt_ids"], batch["completion_ids"], strict=True)):
        inputs["prompt_ids"][row, prompt_width - len(prompt):] = torch.tensor(prompt)  # left-padded
        inputs["prompt_mask"][row, prompt_width - len(prompt):] = 1
        inputs["completion_ids"][row, :len(completion)] = torch.tensor(completion)
        inputs["completion_mask"][row, :len(completion)] = 1
        inputs["old_per_token_logps"][row, :len(completion)] = batch["old"][row]
        inputs["ref_per_token_logps"][row, :len(completion)] = batch["ref"][row]
    inputs["advantages"] = batch["advantages"]
    inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
    return inputs


def our_batch(batch) -> PolicyBatch:
    """The batch in our layout: the sequences packed into rows, per-token tensors in the completion layout."""
    sequences = pack_rows(batch["prompt_ids"], batch["completion_ids"], batch["pad"])
    old, ref = torch.zeros(sequences.mask.shape), torch.zeros(sequences.mask.shape)
    for row, (old_row, ref_row) in enumerate(zip(batch["old"], batch["ref"], strict=True)):
        old[row, :len(old_row)], ref[row, :len(ref_row)] = old_row, ref_row
    return PolicyBatch(sequences, batch["advantages"], old_logprobs=old, ref_logprobs=ref)


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


def trl_loss_and_gradients(model_dir, batch, loss_type: str, level: str, output_dir, **overrides) -> tuple[float, dict]:
    """Stock TRL: a GRPOTrainer with the same settings, its public compute_loss on the batch, then backward."""
    import datasets

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    options = {"beta": BETA, "entropy_coef": ENTROPY_COEF, **overrides}
    args = trl.GRPOConfig(
        output_dir=str(output_dir), use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=PROMPTS * SAMPLES,
        num_generations=SAMPLES, max_completion_length=MAX_NEW_TOKENS, temperature=TEMPERATURE, loss_type=loss_type,
        importance_sampling_level=level, epsilon=EPSILON, epsilon_high=EPSILON_HIGH, use_vllm=False, **options)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[lambda completions, **kwargs: [0.0] * len(completions)],
                              args=args, processing_class=tokenizer,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["a"] * SAMPLES}))
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # one micro-batch per optimiser step, as our loop
    loss = trainer.compute_loss(trainer.model, trl_inputs(batch))
    loss.backward()
    return loss.item(), gradients(trainer.model)


@pytest.fixture(scope="module")
def losses():
    return {}  # (loss_type, level) -> our loss, filled by the parity test


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_loss_and_gradient_equal_trl(loss_type, level, batch, tiny_moe_dir, tmp_path, losses):
    settings = settings_for(loss_type, level)
    model = load_model(tiny_moe_dir)
    model.train()
    inputs, aux_coef = our_batch(batch), aux_loss_coefficient(model, settings)
    loss, stats, forward = grpo_loss(model, inputs, settings, aux_coef)
    loss.backward()
    ours = gradients(model)
    # The loss is a sum of terms of either sign that nearly cancel (GRPO's advantages are centred), so its
    # relative error is taken against the sum of the terms' magnitudes, the scale of its float32 rounding.
    entropy_bonus = ENTROPY_COEF * masked_mean(forward.entropy, inputs.sequences.mask).item()
    aux_term = aux_coef * stats["aux_loss"]
    kl_term = loss.item() - stats["policy_loss"] + entropy_bonus - aux_term
    assert stats["aux_loss"] > 0 and 0 < stats["clip_fraction"] < 1 and kl_term > 0  # every term acts
    scale = abs(stats["policy_loss"]) + kl_term + entropy_bonus + aux_term

    trl_loss, theirs = trl_loss_and_gradients(tiny_moe_dir, batch, loss_type, level, tmp_path)
    assert abs(loss.item() - trl_loss) <= RELATIVE_ERROR * scale, (loss.item(), trl_loss, scale)
    assert ours.keys() == theirs.keys()
    flat_ours, flat_theirs = torch.cat([g.flatten() for g in ours.values()]), torch.cat([theirs[k].flatten() for k in ours])
    assert relative_error(flat_ours, flat_theirs) <= RELATIVE_ERROR
    for name in ours:  # and parameter by parameter (a wrong term in one layer cannot hide in the total)
        assert relative_error(ours[name], theirs[name]) <= 1e-4, name
    losses[loss_type, level] = loss.item()


def test_the_settings_reach_the_loss(losses):
    """The parametrised cases are not one case eight times: each loss type and level gives its own loss, except
    dapo and bnpo, which coincide when a step's whole batch is one micro-batch (dapo normalises by the token
    count of the generation batch, bnpo by that of the micro-batch; rl.losses.aggregate), in TRL as here."""
    if len(losses) < 8:
        pytest.skip("needs the eight parity cases of this module")
    for level in ("token", "sequence"):
        assert losses["dapo", level] == losses["bnpo", level]
    distinct = {round(value, 6) for (loss_type, _), value in losses.items() if loss_type != "dapo"}
    assert len(distinct) == 6
