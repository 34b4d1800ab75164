"""Typed configuration of RL post-training: algorithm, sampling, rollout engine, rewards and mitigations.

Defaults follow the Echo Chamber paper's GSM8K runs scaled to a 2-core CPU. Every mitigation is one
switch of `MitigationSettings`, whose description names its source; the math is in rl.losses / rl.replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from specialists.config import Strict
from specialists.errors import SettingsError, UserError
from specialists.prompt_data import PromptColumns, PromptSplit, check_columns, prompt_split
from specialists.prompting import TEMPLATE_FIELDS, template_problem
from specialists.tasks import PROMPT_TEMPLATE


class SamplingSettings(Strict):
    """The same sampling parameters go to both engines."""

    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(96, ge=1)
    samples_per_prompt: int = Field(8, ge=1)


class EngineSettings(Strict):
    kind: Literal["vllm", "hf"] = Field("vllm", description="vllm: vLLM with weight sync after every update; hf: transformers generate")
    kv_cache_gib: float = Field(1.0, gt=0, description="vLLM KV cache (VLLM_CPU_KVCACHE_SPACE on CPU)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description=(
        "precision of vLLM's rollouts; training stays float32 and the weights are cast on every sync. bfloat16 "
        "samples from a slightly different model than the one trained (correct it with tis_cap)"))

    @model_validator(mode="after")
    def _bfloat16_is_vllm(self) -> "EngineSettings":
        if self.kind == "hf" and self.dtype != "float32":
            raise SettingsError("dtype bfloat16 needs kind 'vllm': the hf engine samples from the float32 training "
                                "model", "dtype", "kind")
        return self


class GRPOSettings(Strict):
    """GRPO's knobs (rl/grpo.py); names and semantics as in TRL's GRPOConfig where TRL has them."""

    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = Field(1, ge=1, description="optimisation passes over each batch of rollouts (mu)")
    importance_sampling_level: Literal["token", "sequence"] = Field("token", description=(
        "token: PPO's per-token ratio; sequence: GSPO's length-normalised sequence ratio (Zheng et al. 2025, "
        "arXiv:2507.18071; TRL's importance_sampling_level; rl.losses.importance_ratio)"))
    baseline: Literal["mean", "leave_one_out"] = Field("mean", description=(
        "mean: the group mean (GRPO); leave_one_out: the mean of the other samples of the prompt (RLOO, "
        "Ahmadian et al. 2024, arXiv:2402.14740; rl.losses.group_advantages)"))
    dynamic_sampling: bool = Field(False, description=(
        "DAPO dynamic sampling (Yu et al. 2025, arXiv:2503.14476, sec. 3.2; verl's filter_groups): groups whose "
        "rewards are all equal are dropped and refilled with groups of further seeded prompts, up to "
        "dynamic_sampling_rounds more engine calls; short of groups after them, the batch is topped up with "
        "dropped groups (rl.rollouts.dynamic_sampling). GRPO"))
    dynamic_sampling_rounds: int = Field(3, ge=1, description=(
        "dynamic sampling's most extra engine calls per step, each of prompts_per_step further prompts"))


class PPOSettings(Strict):
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    value_coef: float = Field(0.5, ge=0)
    value_clip: float = Field(0.2, gt=0)
    epochs: int = Field(2, ge=1, description="optimisation passes over each batch of rollouts")
    minibatches: int = Field(2, ge=1)


class ExpertIterationSettings(Strict):
    sft_epochs: int = Field(2, ge=1)
    start_from: Literal["base", "latest"] = Field("base", description="fine-tune each round from the base model (the paper) or the latest one")


@dataclass(frozen=True)
class Switch:
    """What a mitigation switch of MitigationSettings says of itself, beside its field: the algorithms that implement
    it (a config that switches it on for another is refused when it is loaded, RLSettings._algorithm_rules), and
    whether a data-parallel run can split it across processes (else `--processes N` refuses it, split_problem)."""

    algorithms: tuple[str, ...]
    data_parallel: bool


@dataclass(frozen=True)
class Tunes:
    """A field of MitigationSettings that only tunes the switches it names: never refused, nor a mitigation, alone."""

    switches: tuple[str, ...]

    def __init__(self, *switches: str):
        object.__setattr__(self, "switches", switches)


class MitigationSettings(Strict):
    """Diversity mitigations, each off by default. Every switch names its source and (its `Switch`) the algorithms
    that implement it; a config that switches one on for another algorithm is refused when it is loaded. Every
    other field `Tunes` a switch."""

    entropy_coef: Annotated[float, Switch(("grpo", "ppo"), data_parallel=True)] = Field(0.0, ge=0, description=(
        "entropy bonus, loss -= coef * mean token entropy (Mnih et al. 2016, arXiv:1602.01783; TRL's entropy_coef). "
        "PPO, GRPO"))
    clip_cov: Annotated[bool, Switch(("grpo", "ppo"), data_parallel=False)] = Field(False, description=(
        "Clip-Cov: no gradient for a few tokens of high log-prob/advantage covariance (Cui et al. 2025, "
        "arXiv:2505.22617; rl.losses.clip_cov_mask). PPO, GRPO"))
    kl_cov: Annotated[bool, Switch(("grpo", "ppo"), data_parallel=False)] = Field(False, description=(
        "KL-Cov: |log pi - log pi_old| penalty on the top-covariance tokens (Cui et al. 2025, arXiv:2505.22617; "
        "rl.losses.kl_cov_penalty). PPO, GRPO (needs grpo.num_iterations > 1)"))
    cov_ratio: Annotated[float, Tunes("clip_cov", "kl_cov")] = Field(2e-3, gt=0, le=1, description=(
        "fraction of tokens Clip-Cov / KL-Cov act on (Cui et al.'s r / k)"))
    kl_cov_coef: Annotated[float, Tunes("kl_cov")] = Field(1.0, ge=0, description=(
        "KL-Cov's penalty weight (Cui et al.'s beta)"))
    format_diversity_coef: Annotated[float, Switch(("grpo", "ppo", "ei"), data_parallel=True)] = Field(
        0.0, ge=0, description=(
        "reward bonus coef * (1 - share of its format in the group) for correct completions; echolab's own, "
        "no paper (rl.losses.format_diversity_bonus). PPO, GRPO, EI (recorded reward only)"))
    unlikeliness_beta: Annotated[float, Switch(("grpo",), data_parallel=True)] = Field(0.0, ge=0, le=1, description=(
        "unlikeliness reward: likely correct completions get less reward (He, Fried & Welleck 2025, "
        "arXiv:2506.02355; rl.losses.unlikeliness_rewards). GRPO"))
    pass_at_k: Annotated[int, Switch(("grpo",), data_parallel=True)] = Field(0, ge=0, description=(
        "pass@k training: analytical pass@k advantages (Chen et al. 2025, arXiv:2508.10751; "
        "rl.losses.pass_at_k_advantages); 0 = off. GRPO"))
    freeze_router: Annotated[bool, Switch(("grpo", "ppo", "ei"), data_parallel=True)] = Field(False, description=(
        "keep every MoE router weight as pretrained during RL (rl.training.frozen_router); echolab's own "
        "ablation, no paper: routing can then change only through the hidden states the router sees. PPO, GRPO, EI"))
    pretrain_replay_coef: Annotated[float, Switch(("grpo", "ppo"), data_parallel=False)] = Field(
        0.0, ge=0, description=(
        "loss += coef * mean token NLL of a batch of pretraining texts each optimiser step (PPO-ptx, Ouyang et al. "
        "2022, arXiv:2203.02155, eq. 2; rl.replay). PPO, GRPO"))
    pretrain_replay_batch: Annotated[int, Tunes("pretrain_replay_coef")] = Field(8, ge=1, description=(
        "pretraining texts per replay batch"))
    prefix_kl_coef: Annotated[float, Switch(("grpo", "ppo"), data_parallel=True)] = Field(0.0, ge=0, description=(
        "prefix KL: loss += coef * k3 KL to the reference on the first prefix_kl_tokens completion tokens only, "
        "aggregated as the policy loss (rl.losses.prefix_mask); echolab's own, no paper: the format is decided "
        "there (issue 14), while rl.beta spreads the same penalty over every token. PPO, GRPO"))
    prefix_kl_tokens: Annotated[int, Tunes("prefix_kl_coef")] = Field(3, ge=1, description=(
        "K, the completion tokens prefix_kl_coef acts on"))
    sequence_kl_coef: Annotated[float, Switch(("grpo", "ppo"), data_parallel=True)] = Field(0.0, ge=0, description=(
        "sequence KL in the reward: r <- r - coef * sum_t (log pi_old(y_t) - log pi_ref(y_t)) over the completion "
        "(rl.losses.sequence_log_ratio; the KL-in-the-reward of Ziegler et al. 2019, arXiv:1909.08593, summed per "
        "sequence). PPO, GRPO"))
    format_kl_coef: Annotated[float, Switch(("grpo", "ppo"), data_parallel=False)] = Field(0.0, ge=0, description=(
        "format-mix KL to the base: r <- r - coef * log p(f) / q(f), p the step's format shares, q the step-0 "
        "batch's (the base model's), both add-1/2 smoothed: the policy gradient of -coef * KL(p || q) over formats "
        "(rl.losses.format_kl_shares; echolab's own, issue 14). Batch shares, not the group's: q is a batch "
        "statistic and G samples estimate a share too noisily. PPO, GRPO (not with grpo.dynamic_sampling)"))
    outcome_exploration_coef: Annotated[float, Switch(("grpo", "ppo"), data_parallel=False)] = Field(
        0.0, ge=0, description=(
        "outcome-based exploration: r <- r + coef * (b - p), b = 1/sqrt(N(x, a)) for a final answer a seen N times "
        "on the prompt in earlier steps (1 if never), p = the share of the group's other samples with the same "
        "answer (Song, Kempe & Munos 2025, arXiv:2509.06941; rl.losses.historical_exploration_bonus, "
        "batch_exploration_penalty). PPO, GRPO"))
    outcome_exploration_mode: Annotated[Literal["historical", "batch", "both"],
                                        Tunes("outcome_exploration_coef")] = Field("both", description=(
        "which terms outcome_exploration_coef adds: the historical bonus b, the batch penalty p, or both"))


class HeldoutEvaluationSettings(Strict):
    """Held-out evaluation during RL (`[rl.evaluation]`): at every `every`-th step, and at the final model's step,
    the policy of that step samples held-out problems (never RL prompts) with the rollout engine; the rows go to
    the run directory's heldout/ folder and `echolab analyze` turns them into held-out pass@k and format shares."""

    every: int = Field(0, ge=0, description=(
        "evaluate the model of every step s with s % every == 0, and of the last step; 0 = off"))
    num_problems: int = Field(64, ge=1, description=(
        "held-out problems per evaluation: the synthetic task's eval split, or the first of a prompt file's "
        "held-out split (heldout_prompts / heldout_fraction)"))
    samples_per_problem: int = Field(8, ge=1, description="completions per problem: pass@k for k up to this")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (top_p and max_new_tokens: rl.sampling's)")


def mitigation_roles(settings: type[BaseModel]) -> tuple[dict[str, Switch], dict[str, tuple[str, ...]]]:
    """The switches of a mitigations model ({name: Switch}) and its tuning parameters ({name: the switches it tunes}),
    read from each field's annotation. A field with neither (a new mitigation that does not say which algorithms
    implement it) or a parameter of no switch is a TypeError, raised when rl.config is imported."""
    switches, parameters = {}, {}
    for name, field in settings.model_fields.items():
        role = next((item for item in field.metadata if isinstance(item, (Switch, Tunes))), None)
        if isinstance(role, Switch):
            switches[name] = role
        elif isinstance(role, Tunes):
            parameters[name] = role.switches
        else:
            raise TypeError(f"{settings.__name__}.{name}: annotate it with a Switch (the algorithms that implement it, "
                            "whether it splits across processes) or Tunes (the switches it tunes)")
    for name, tuned in parameters.items():
        if not set(tuned) <= set(switches):
            raise TypeError(f"{settings.__name__}.{name} tunes {', '.join(sorted(set(tuned) - set(switches)))}, "
                            "which is no switch")
    return switches, parameters


MITIGATION_SWITCHES, MITIGATION_PARAMETERS = mitigation_roles(MitigationSettings)


class RLSettings(Strict):
    seed: int | None = Field(None, description="seed of RL (prompt order, sampling, updates); None = the top-level seed. "
                             "Setting it varies RL on one shared pretrained base")
    algorithm: Literal["grpo", "ppo", "ei"] = "grpo"
    steps: int = Field(30, ge=1, description=(
        "RL steps: each samples a batch of rollouts and updates the model with it (PPO: epochs x minibatches "
        "updates, GRPO: num_iterations, EI: one round); one more step then samples the final model"))
    prompts_per_step: int = Field(8, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference (initial) model")
    kl_estimator: Literal["k1", "k3"] = Field("k3", description="k1: in the reward (PPO only); k3: as a loss term")
    epsilon: float = Field(0.2, gt=0, description="clip range below 1 (epsilon_low)")
    epsilon_high: float | None = Field(None, gt=0, description="clip range above 1; None = epsilon. DAPO clip-higher: 0.28")
    reward_scale: float = Field(1.0, gt=0, description="multiplies the correctness reward")
    tis_cap: float | None = Field(None, ge=1, description=(
        "truncated importance sampling: weight each token's policy loss by min(pi_trainer / pi_sampler, tis_cap) "
        "against the train/inference mismatch (Yao et al. 2025, 'Your efficient RL framework secretly brings you "
        "off-policy RL training'; TRL's vllm_importance_sampling_cap; rl.losses.truncated_importance_weights); "
        "None = off. PPO, GRPO"))
    router_aux_loss_coef: float | None = Field(None, ge=0, description="None: the model's own coefficient")
    num_prompts: int = Field(256, ge=1, description="size of the RL prompt set (epochs are counted over it)")
    prompt_columns: PromptColumns = Field(PromptColumns(), description="the question and answer columns of the prompt files")
    prompts: str = Field("synthetic", description=(
        "'synthetic' (generated train problems) or a prompt file: .jsonl, .parquet or a datasets.save_to_disk "
        "directory with GSM8K- or MATH-style answers (specialists.prompt_data)"))
    heldout_prompts: str | None = Field(None, description=(
        "a second prompt file (same columns) as the held-out problems; RL prompts also in it are dropped with a warning"))
    heldout_fraction: float = Field(0.0, ge=0, lt=1, description=(
        "hold out this fraction of the prompt file's distinct questions instead (drawn with heldout_seed); 0 = none"))
    heldout_seed: int = Field(0, description=(
        "seed of the held-out draw: its own, so runs that vary the seeds of RL share one split"))
    prompt_template: str = Field(PROMPT_TEMPLATE, description=(
        "the prompt, a format string over the problem's fields: " + ", ".join(f"{{{name}}}" for name in TEMPLATE_FIELDS)
        + " (specialists.prompting)"))
    chat_template: bool = Field(False, description=(
        "wrap the prompt as the user turn of the tokenizer's own chat template (model.path bases that have one)"))
    checkpoint_every: int = Field(10, ge=1)
    sampling: SamplingSettings = SamplingSettings()
    engine: EngineSettings = EngineSettings()
    grpo: GRPOSettings = GRPOSettings()
    ppo: PPOSettings = PPOSettings()
    expert_iteration: ExpertIterationSettings = ExpertIterationSettings()
    mitigations: MitigationSettings = MitigationSettings()
    evaluation: HeldoutEvaluationSettings = HeldoutEvaluationSettings()

    @field_validator("prompt_template")
    @classmethod
    def _usable_template(cls, value: str) -> str:
        problem = template_problem(value)
        if problem:
            raise SettingsError(problem)
        return value

    @field_validator("prompts", "heldout_prompts")
    @classmethod
    def _readable_prompt_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A supported file with the configured columns (a UserError, a ValueError, names the file, the missing
        column and the columns it has). `prompt_columns` is declared first, so it is in `info.data`."""
        if value is not None and value != "synthetic" and "prompt_columns" in info.data:
            check_columns(value, info.data["prompt_columns"])
        return value

    @model_validator(mode="after")
    def _one_heldout_split(self) -> "RLSettings":
        """At most one held-out split, of a prompt file; every row of the files read now (a bad answer cell must
        not cost a pretraining)."""
        held_out = "heldout_prompts" if self.heldout_prompts is not None else "heldout_fraction"
        if self.prompts == "synthetic" and (self.heldout_prompts is not None or self.heldout_fraction > 0):
            raise SettingsError("heldout_prompts and heldout_fraction split a prompt file; synthetic prompts have "
                                "their own held-out split", held_out, "prompts")
        if self.heldout_prompts is not None and self.heldout_fraction > 0:
            raise SettingsError("give heldout_prompts or heldout_fraction, not both", "heldout_fraction",
                                "heldout_prompts")
        if self.prompts != "synthetic":
            try:
                split = self.prompt_split()
            except SettingsError:
                raise
            except UserError as error:  # a bad row: named at the `prompts` line
                raise SettingsError(f"prompts: {error}", "prompts") from None
            evaluation = self.evaluation
            if evaluation.every > 0 and len(split.heldout) < evaluation.num_problems:
                raise SettingsError(f"evaluation.num_problems ({evaluation.num_problems}) needs that many held-out "
                                    f"problems, but the prompt file's held-out split has {len(split.heldout)} "
                                    "(lower it, or hold out more: heldout_fraction, heldout_prompts)",
                                    "evaluation.num_problems", "prompts")
        return self

    @model_validator(mode="after")
    def _algorithm_rules(self) -> "RLSettings":
        """The rules that combine settings, so that a config that would fail, or silently do nothing, is refused
        when it is loaded. Each names the settings at fault, the one to change first."""
        algorithm, sampling, mitigations = self.algorithm, self.sampling, self.mitigations
        defaults = MitigationSettings()
        for name, switch in MITIGATION_SWITCHES.items():
            if getattr(mitigations, name) != getattr(defaults, name) and algorithm not in switch.algorithms:
                raise SettingsError(f"algorithm {algorithm!r} does not implement mitigations.{name} (only "
                                    f"{', '.join(sorted(switch.algorithms))} do)", f"mitigations.{name}", "algorithm")
        if algorithm == "ei" and self.beta > 0:
            raise SettingsError("Expert Iteration has no KL term: set beta = 0", "beta", "algorithm")
        if algorithm == "ei" and self.epsilon_high is not None:
            raise SettingsError("Expert Iteration has no clipped ratio: epsilon_high does nothing", "epsilon_high",
                                "algorithm")
        if algorithm == "ei" and self.tis_cap is not None:
            raise SettingsError("Expert Iteration has no policy-gradient loss to reweight: tis_cap does nothing",
                                "tis_cap", "algorithm")
        if self.kl_estimator == "k1" and algorithm != "ppo" and self.beta > 0:
            raise SettingsError("kl_estimator 'k1' (KL in the reward) is PPO's; GRPO and EI use 'k3'", "kl_estimator",
                                "algorithm")
        if algorithm != "grpo" and self.grpo.dynamic_sampling:
            raise SettingsError(f"algorithm {algorithm!r} does not implement grpo.dynamic_sampling (only grpo does)",
                                "grpo.dynamic_sampling", "algorithm")
        if self.grpo.dynamic_sampling and mitigations.format_kl_coef > 0:
            raise SettingsError("mitigations.format_kl_coef measures the base model's format shares on step 0's batch, "
                                "which grpo.dynamic_sampling filters to prompts of mixed outcome: switch on one",
                                "mitigations.format_kl_coef", "grpo.dynamic_sampling")
        if algorithm == "grpo" and sampling.samples_per_prompt < 2:
            raise SettingsError("GRPO needs sampling.samples_per_prompt >= 2: its advantages compare the samples of "
                                "a prompt", "sampling.samples_per_prompt", "algorithm")
        if algorithm == "grpo" and sampling.temperature <= 0:
            raise SettingsError("GRPO needs sampled rollouts: sampling.temperature must be > 0 (greedy samples of a "
                                "prompt are all equal, so every advantage is 0)", "sampling.temperature", "algorithm")
        if algorithm == "ppo" and self.ppo.minibatches > self.prompts_per_step * sampling.samples_per_prompt:
            raise SettingsError(f"ppo.minibatches ({self.ppo.minibatches}) must be <= the completions of a step, "
                                f"prompts_per_step x sampling.samples_per_prompt "
                                f"({self.prompts_per_step * sampling.samples_per_prompt})", "ppo.minibatches")
        if mitigations.pass_at_k > sampling.samples_per_prompt:
            raise SettingsError(f"mitigations.pass_at_k ({mitigations.pass_at_k}) must be <= sampling.samples_per_prompt "
                                f"({sampling.samples_per_prompt}): pass@k is estimated within a prompt's samples",
                                "mitigations.pass_at_k", "sampling.samples_per_prompt")
        reward_terms = ("unlikeliness_beta", "format_diversity_coef", "sequence_kl_coef", "format_kl_coef",
                        "outcome_exploration_coef")
        if mitigations.pass_at_k and any(getattr(mitigations, name) > 0 for name in reward_terms):
            other = next(name for name in reward_terms if getattr(mitigations, name) > 0)
            raise SettingsError(f"mitigations.pass_at_k replaces the advantages by pass@k ones computed from correctness "
                                f"alone; it does not combine with mitigations.{other}", "mitigations.pass_at_k",
                                f"mitigations.{other}")
        if mitigations.pass_at_k and (self.grpo.baseline != "mean" or self.grpo.scale_rewards != "group"):
            other = "baseline" if self.grpo.baseline != "mean" else "scale_rewards"
            raise SettingsError(f"mitigations.pass_at_k's advantages are computed in closed form; grpo.{other} does "
                                "not apply to them", f"grpo.{other}", "mitigations.pass_at_k")
        if mitigations.clip_cov and mitigations.kl_cov:
            raise SettingsError("mitigations.clip_cov and mitigations.kl_cov are alternatives (Cui et al. 2025); "
                                "switch on one", "mitigations.kl_cov", "mitigations.clip_cov")
        evaluation = self.evaluation
        if evaluation.every > 0 and evaluation.temperature <= 0 and evaluation.samples_per_problem > 1:
            raise SettingsError(f"evaluation.samples_per_problem ({evaluation.samples_per_problem}) needs "
                                "evaluation.temperature > 0: greedy samples of a problem are all equal, so pass@k "
                                "would be pass@1", "evaluation.samples_per_problem", "evaluation.temperature")
        # The first optimisation pass over a batch runs on the weights that sampled it, so the ratio
        # pi / pi_old is exactly 1 there: a setting that acts through the ratio needs a second pass.
        passes, passes_key = ((self.grpo.num_iterations, "grpo.num_iterations") if algorithm == "grpo" else
                              (self.ppo.epochs * self.ppo.minibatches, "ppo.epochs"))
        passes_text = "grpo.num_iterations > 1" if algorithm == "grpo" else "ppo.epochs x ppo.minibatches > 1"
        if algorithm != "ei" and passes == 1:
            if mitigations.kl_cov:
                raise SettingsError(f"mitigations.kl_cov needs {passes_text}: its penalty |log pi - log pi_old| has "
                                    "zero gradient on the first pass over a batch, so with one pass it does nothing",
                                    "mitigations.kl_cov", passes_key)
            if self.epsilon_high is not None:
                raise SettingsError(f"epsilon_high needs {passes_text}: the ratio pi / pi_old is 1 on the first pass "
                                    "over a batch, so with one pass no clip range acts", "epsilon_high", passes_key)
        return self

    def prompt_split(self) -> PromptSplit:
        """The RL prompts and held-out problems of the prompt file (`prompts` not 'synthetic')."""
        return prompt_split(self.prompts, self.prompt_columns, self.heldout_prompts, self.heldout_fraction,
                            self.heldout_seed)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss or the reward reads log pi_ref, the frozen base model's log-probs."""
        return self.beta > 0 or self.mitigations.prefix_kl_coef > 0 or self.mitigations.sequence_kl_coef > 0

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


# Completions per transformers `generate` call of the hf engine (rl.engines.HFEngine).
HF_GENERATE_BATCH = 64


def hf_prompts_per_call(sampling: SamplingSettings, batch_size: int = HF_GENERATE_BATCH) -> int:
    """Prompts per generate call of the hf engine: as many whole groups as fit in `batch_size` completions."""
    return max(1, batch_size // sampling.samples_per_prompt)


def split_problem(settings: RLSettings, processes: int) -> str | None:
    """Why these settings cannot run data-parallel (rl.distributed) in `processes` processes with the results of
    one process, or None (checked before any work: `echolab run --processes N`). What is not split: Expert
    Iteration (its SFT round and start-from-base reload are written for one process), and the steps whose
    statistics span the whole batch in ways the recipes do not reduce across ranks: dynamic sampling's group
    selection, GRPO's batch reward scale, and the mitigation switches whose `Switch` says data_parallel=False
    (Clip-Cov and KL-Cov's batch-wide token selection, the pretraining replay batch, the format-mix KL's batch
    shares, outcome exploration's per-prompt answer history, which would follow a prompt from rank to rank)."""
    mitigations = settings.mitigations
    if processes < 1:
        return "needs at least 1 process"
    if settings.prompts_per_step % processes:
        return f"rl.prompts_per_step = {settings.prompts_per_step} does not split evenly into {processes} processes"
    if settings.algorithm not in ("grpo", "ppo"):
        return f"data-parallel runs support rl.algorithm grpo and ppo, not {settings.algorithm!r}"
    batch_scale = settings.algorithm == "grpo" and settings.grpo.scale_rewards == "batch"
    defaults = MitigationSettings()
    unsupported = {"rl.grpo.dynamic_sampling": settings.grpo.dynamic_sampling,
                   "rl.grpo.scale_rewards = 'batch'": batch_scale,
                   **{f"rl.mitigations.{name}": getattr(mitigations, name) != getattr(defaults, name)
                      for name, switch in MITIGATION_SWITCHES.items() if not switch.data_parallel}}
    for name, on in unsupported.items():
        if on:
            return f"{name} is not supported in data-parallel runs (it needs the whole batch in one process)"
    share = settings.prompts_per_step // processes
    per_call = hf_prompts_per_call(settings.sampling)
    if settings.engine.kind == "hf" and share % per_call:
        return (f"the hf engine samples {per_call} prompts per generate call, and each process's {share} prompts are "
                f"not a whole number of calls (its samples would differ from one process's): use rl.engine.kind = "
                f"'vllm', or rl.prompts_per_step a multiple of {per_call * processes}")
    return None
