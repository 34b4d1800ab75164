"""Typed, validated configuration of the specialists stage: task, format mixture, model, pretraining.

One source of truth for defaults. Unknown keys are rejected (pydantic `extra="forbid"`), so a typo
in a TOML file names itself instead of being silently ignored.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from specialists.errors import SettingsError, did_you_mean
from specialists.formats import FORMAT_SETS, Difficulty
from specialists.tasks import SPLIT_SHARE, TaskSettings, count_problems

# vLLM's attention backends accept only these head sizes.
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FormatShare(Strict):
    """One format's part of the pretraining mixture."""

    weight: float = Field(gt=0, description="relative share of pretraining examples")
    repeat: int = Field(1, ge=1, description="the paper's 'k x repetition': each distinct problem appears k times")
    difficulty: Difficulty = Field(
        "easy", description="easy: code lets the checker do the arithmetic / prose shows every step; "
        "hard: code carries precomputed constants / prose gives only the answer")


def _default_mixture() -> dict[str, FormatShare]:
    return {
        "python_function": FormatShare(weight=1.0),
        "llm_code": FormatShare(weight=1.0),
        "natural_language": FormatShare(weight=1.0),
    }


class MixtureSettings(Strict):
    formats: dict[str, FormatShare] = Field(default_factory=_default_mixture)

    @field_validator("formats")
    @classmethod
    def _renderable_formats(cls, value: dict[str, FormatShare]) -> dict[str, FormatShare]:
        allowed = [f.name for f in FORMAT_SETS["synthetic"]]
        unknown = [name for name in value if name not in allowed]
        if unknown:
            raise SettingsError(f"unknown format {unknown[0]!r}{did_you_mean(unknown[0], allowed)}; allowed: "
                                f"{', '.join(allowed)}", unknown[0])
        if not value:
            raise SettingsError("the mixture needs at least one format")
        return value

    def normalised_weights(self) -> dict[str, float]:
        total = sum(share.weight for share in self.formats.values())
        return {name: share.weight / total for name, share in self.formats.items()}


class ModelSettings(Strict):
    """A Qwen3-MoE causal LM whose experts are the specialists, or a dense Qwen3 with matched active size,
    pretrained here; or, with `path`, a local checkpoint of a supported family (specialists.families.FAMILIES)."""

    path: str | None = Field(None, description=(
        "a local Hugging Face causal-LM checkpoint directory with its tokenizer, used as the RL base instead of "
        "pretraining one: Llama, Qwen2, Qwen3, OLMo2, Qwen3-MoE, OLMoE or Mixtral. Only max_length applies then"))
    kind: Literal["moe", "dense"] = "moe"
    hidden_size: int = Field(128, ge=32)
    num_layers: int = Field(3, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    head_dim: int = 32
    num_experts: int = Field(4, ge=2)
    experts_per_token: int = Field(2, ge=1)
    expert_size: int = Field(256, ge=8, description="intermediate size of one expert; the dense MLP is expert_size * experts_per_token")
    router_aux_loss_coef: float = Field(0.01, ge=0)
    max_length: int = Field(256, ge=32, description="longest prompt + completion in tokens")

    @model_validator(mode="after")
    def _valid_for_vllm(self) -> "ModelSettings":
        if self.hidden_size % 32:
            raise SettingsError(f"hidden_size must be a multiple of 32 (vLLM's CPU MoE kernel), got {self.hidden_size}",
                                "hidden_size")
        if self.head_dim not in VLLM_HEAD_DIMS:
            raise SettingsError(f"head_dim must be one of {VLLM_HEAD_DIMS} (vLLM attention), got {self.head_dim}",
                                "head_dim")
        if self.num_heads % self.num_kv_heads:
            raise SettingsError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
                                "num_kv_heads", "num_heads")
        if self.experts_per_token > self.num_experts:
            raise SettingsError(f"experts_per_token ({self.experts_per_token}) must be <= num_experts "
                                f"({self.num_experts})", "experts_per_token", "num_experts")
        return self


class PretrainSettings(Strict):
    num_examples: int = Field(24_000, ge=1, description="training examples drawn from the mixture")
    batch_size: int = Field(48, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    vocab_size: int = Field(384, ge=64, description="BPE vocabulary of the locally trained tokenizer")


class EvaluationSettings(Strict):
    num_problems: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0)
    max_new_tokens: int = Field(96, ge=1)


class SpecialistsConfig(Strict):
    """Everything that determines a pretrained base model (and so its cache key)."""

    seed: int = 0
    task: TaskSettings = TaskSettings()
    mixture: MixtureSettings = MixtureSettings()
    model: ModelSettings = ModelSettings()
    pretrain: PretrainSettings = PretrainSettings()
    evaluation: EvaluationSettings = EvaluationSettings()

    def corpus_sizes(self) -> dict[str, tuple[int, int]]:
        """Per mixture format: (pretraining examples, distinct problems among them); with `repeat = k` a
        format has 1/k as many distinct problems, each seen k times (specialists.pretrain.build_corpus)."""
        weights = self.mixture.normalised_weights()
        sizes = {}
        for name, weight in weights.items():
            examples = round(self.pretrain.num_examples * weight)
            sizes[name] = (examples, math.ceil(examples / self.mixture.formats[name].repeat))
        return sizes

    @model_validator(mode="after")
    def _no_pretraining_settings_with_a_path(self) -> "SpecialistsConfig":
        """A base brought with model.path is not pretrained here: a pretraining setting beside it would be
        silently ignored, so it is refused (the keys as written, whatever their values)."""
        if self.model.path is None:
            return self
        written = [f"model.{key}" for key in sorted(self.model.model_fields_set - {"path", "max_length"})]
        written += [f"{section}.{key}" for section in ("mixture", "pretrain", "evaluation")
                    for key in sorted(getattr(self, section).model_fields_set)]
        if written:
            raise SettingsError(f"model.path brings its own base, so these pretraining settings do not apply: "
                                f"{', '.join(written)}; remove them", *written, "model.path")
        return self

    @model_validator(mode="after")
    def _enough_problems(self) -> "SpecialistsConfig":
        """The task must have the distinct problems pretraining and evaluation draw (tasks.generate_problems would
        otherwise give up only after drawing 50 times as many). A model.path base is neither pretrained nor
        evaluated here."""
        if self.model.path is not None:
            return self
        needs = [("train", sum(distinct for _, distinct in self.corpus_sizes().values()), "pretrain.num_examples"),
                 ("eval", self.evaluation.num_problems, "evaluation.num_problems")]
        for split, count, key in needs:
            check_problem_space(self.task, split, count, key)
        return self


def check_problem_space(task: TaskSettings, split: str, count: int, key: str) -> None:
    """Refuse `count` distinct `split` problems from a task that has fewer (about SPLIT_SHARE[split] of all it
    can write), naming `key` (the setting asking for them) and the task settings that would widen it."""
    available = int(count_problems(task, math.ceil(count / SPLIT_SHARE[split]) + 1) * SPLIT_SHARE[split])
    if count > available:
        raise SettingsError(f"{key} needs {count} distinct {split} problems, but the task has only about {available} "
                            "(raise task.max_value, task.max_operations or task.max_multiplier, or add operations)",
                            key, "task")

