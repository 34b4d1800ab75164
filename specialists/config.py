"""Typed, validated configuration of the specialists stage: task, format mixture, model, pretraining.

One source of truth for defaults. Unknown keys are rejected (pydantic `extra="forbid"`), so a typo
in a TOML file names itself instead of being silently ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from specialists.corpus import file_digest, read_texts
from specialists.errors import SettingsError, did_you_mean
from specialists.formats import FORMAT_SETS, Difficulty, load_formats
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
    data: str | None = Field(
        None, description="a JSONL file of this format's own texts (one {\"text\": ...} per line) to pretrain on "
        "instead of rendered synthetic problems; a path relative to the working directory")

    @field_validator("data")
    @classmethod
    def _readable_corpus(cls, value: str | None) -> str | None:
        if value is not None:
            read_texts(value)  # a missing, non-JSONL, text-less or empty file is refused now, naming file and line
        return value

    @model_validator(mode="after")
    def _difficulty_is_for_rendering(self) -> "FormatShare":
        if self.data is not None and self.difficulty != "easy":  # the default, which a resolved config repeats
            raise ValueError("difficulty applies to rendered synthetic problems, not to a data file's texts")
        return self


def _default_mixture() -> dict[str, FormatShare]:
    return {
        "python_function": FormatShare(weight=1.0),
        "llm_code": FormatShare(weight=1.0),
        "natural_language": FormatShare(weight=1.0),
    }


class MixtureSettings(Strict):
    formats: dict[str, FormatShare] = Field(default_factory=_default_mixture)
    format_set: str = Field(
        "synthetic", description="the format set the mixture's names come from and the base is evaluated with: "
        "a built-in set name or a TOML/YAML format file (formats without `data` must be renderable synthetic ones)")

    @model_validator(mode="after")
    def _known_formats(self) -> "MixtureSettings":
        if not self.formats:
            raise SettingsError("the mixture needs at least one format", "formats")
        known = [f.name for f in load_formats(self.format_set)]
        unknown = [name for name in self.formats if name not in known]
        if unknown:
            raise SettingsError(f"unknown format {unknown[0]!r}{did_you_mean(unknown[0], known)}; format set "
                                f"{self.format_set!r} has: {', '.join(known)}", f"formats.{unknown[0]}", "format_set")
        renderable = [f.name for f in FORMAT_SETS["synthetic"]]
        unrenderable = [name for name, share in self.formats.items() if share.data is None and name not in renderable]
        if unrenderable:
            raise SettingsError(f"formats {unrenderable} need a `data` file: only {renderable} can be rendered from "
                                "synthetic problems", f"formats.{unrenderable[0]}")
        return self

    def normalised_weights(self) -> dict[str, float]:
        total = sum(share.weight for share in self.formats.values())
        return {name: share.weight / total for name, share in self.formats.items()}


class ModelSettings(Strict):
    """A Qwen3-MoE causal LM whose experts are the specialists (`moe`: trained jointly; `btx`: trained apart and
    merged, see `BTXSettings`), or a dense Qwen3 with matched active size, pretrained here; or, with `path`, a
    local checkpoint of a supported family (specialists.families.FAMILIES)."""

    path: str | None = Field(None, description=(
        "a local Hugging Face causal-LM checkpoint directory with its tokenizer, used as the RL base instead of "
        "pretraining one: Llama, Qwen2, Qwen3, OLMo2, Qwen3-MoE, OLMoE or Mixtral. Only max_length applies then"))
    kind: Literal["moe", "dense", "btx"] = "moe"
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


class BTXSettings(Strict):
    """Branch-Train-MiX (Sukhbaatar et al. 2024, "Branch-Train-MiX: Mixing Expert LLMs into a Mixture-of-Experts
    LLM", arXiv:2403.07816), for `model.kind = "btx"`: a dense seed model pretrained briefly on the whole mixture
    is branched into one dense specialist per format, each pretrained on its format's share of the corpus; their
    MLPs become the experts of one Qwen3-MoE (attention, norms and embeddings averaged) whose routers then learn
    on the whole mixture. With the same [model] numbers the merged model has exactly the joint MoE's shape:
    each specialist's MLP is num_experts / formats experts wide (see `specialists.btx`)."""

    seed_fraction: float = Field(0.1, gt=0, le=1, description="share of pretrain.num_examples the shared seed "
                                 "model is pretrained on (the first examples of the shuffled mixture corpus)")
    mix_fraction: float = Field(0.1, gt=0, le=1, description="share of pretrain.num_examples the merged model "
                                "trains on (the last examples of the shuffled mixture corpus)")
    mix_train: Literal["router", "all"] = Field(
        "router", description="what the mix phase trains: the routers only (the merged experts stay the specialists), "
        "or every parameter (the paper's MoE finetuning)")


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
    btx: BTXSettings = Field(BTXSettings(), description="Branch-Train-MiX phases, for model.kind = 'btx' only")

    @model_validator(mode="after")
    def _btx_fits(self) -> "SpecialistsConfig":
        if self.model.kind != "btx":
            if self.btx != BTXSettings():  # settings that would silently do nothing
                raise SettingsError(f"the [btx] section needs model.kind = \"btx\" (got {self.model.kind!r})", "btx",
                                    "model.kind")
            return self
        formats, experts = len(self.mixture.formats), self.model.num_experts
        if experts % formats:
            raise SettingsError(f"model.num_experts = {experts} must be a multiple of the mixture's {formats} formats "
                                "for kind = \"btx\": each specialist's MLP becomes num_experts / formats experts",
                                "model.num_experts")
        empty = [name for name, weight in self.mixture.normalised_weights().items()
                 if round(self.pretrain.num_examples * weight) == 0]
        if empty:
            raise SettingsError(f"formats {empty} get no pretraining examples, so their BTX specialists would stay "
                                "the seed model: raise pretrain.num_examples or their weights", "pretrain.num_examples")
        return self

    @model_validator(mode="after")
    def _corpora_large_enough(self) -> "SpecialistsConfig":
        """A data file must hold the distinct texts its share of the corpus needs (see pretrain.build_corpus)."""
        weights = self.mixture.normalised_weights()
        for name, share in self.mixture.formats.items():
            if share.data is not None:
                needed = math.ceil(round(self.pretrain.num_examples * weights[name]) / share.repeat)
                available = len(read_texts(share.data))
                if available < needed:
                    raise SettingsError(f"mixture.formats.{name}.data: {share.data} has {available} texts, the "
                                        f"mixture needs {needed} distinct ones (pretrain.num_examples x share / repeat)",
                                        f"mixture.formats.{name}.data")
        return self

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

    def base_identity(self) -> dict:
        """What determines the pretrained base, for its cache key: the config and the SHA-256 of each data file
        (an edited corpus is a new base). Settings that do not apply stay out, so that bases cached before they
        existed keep their key: unset optional keys (None: model.path, a format's data), the default format
        set, and the [btx] section unless the model is a BTX one."""
        identity = self.model_dump(mode="json", exclude_none=True, exclude={"btx"} if self.model.kind != "btx" else None)
        if identity["mixture"]["format_set"] == MixtureSettings.model_fields["format_set"].default:
            del identity["mixture"]["format_set"]
        digests = {name: file_digest(share.data) for name, share in self.mixture.formats.items() if share.data is not None}
        if digests:
            identity["corpus_sha256"] = digests
        return identity

    def cache_dir(self) -> Path:
        """Where this config's pretrained base is cached: `cache_root()/pretrain/KEY`, KEY the first 16 hex digits
        of the SHA-256 of `base_identity()`. A complete entry holds `model/` and `evaluation.json`
        (experiments.pipeline.base_model_dir trains it there on first use; analysis finds a run's base there)."""
        key = hashlib.sha256(json.dumps(self.base_identity(), sort_keys=True).encode()).hexdigest()[:16]
        return cache_root() / "pretrain" / key

    @model_validator(mode="after")
    def _enough_problems(self) -> "SpecialistsConfig":
        """The task must have the distinct problems pretraining and evaluation draw (tasks.generate_problems would
        otherwise give up only after drawing 50 times as many). A model.path base is neither pretrained nor
        evaluated here."""
        if self.model.path is not None:
            return self
        needs = [("train", sum(distinct for name, (_, distinct) in self.corpus_sizes().items()
                               if self.mixture.formats[name].data is None), "pretrain.num_examples"),
                 ("eval", self.evaluation.num_problems, "evaluation.num_problems")]
        for split, count, key in needs:
            check_problem_space(self.task, split, count, key)
        return self


def cache_root() -> Path:
    """The root of echolab's cache: `$ECHOLAB_CACHE`, default `~/.cache/echolab`."""
    return Path(os.environ.get("ECHOLAB_CACHE", Path.home() / ".cache" / "echolab"))


def expert_specialists(formats: Sequence[str], num_experts: int) -> list[str]:
    """The format whose specialist each expert of a BTX model came from. Specialists are taken in alphabetical
    order of their formats (an order that survives a config written with sorted keys, as run directories'
    config.json is); specialist f owns the num_experts / len(formats) consecutive experts from
    f * num_experts / len(formats) on."""
    ordered = sorted(formats)
    per_specialist = num_experts // len(ordered)
    return [ordered[expert // per_specialist] for expert in range(num_experts)]


def check_problem_space(task: TaskSettings, split: str, count: int, key: str) -> None:
    """Refuse `count` distinct `split` problems from a task that has fewer (about SPLIT_SHARE[split] of all it
    can write), naming `key` (the setting asking for them) and the task settings that would widen it."""
    available = int(count_problems(task, math.ceil(count / SPLIT_SHARE[split]) + 1) * SPLIT_SHARE[split])
    if count > available:
        raise SettingsError(f"{key} needs {count} distinct {split} problems, but the task has only about {available} "
                            "(raise task.max_value, task.max_operations or task.max_multiplier, or add operations)",
                            key, "task")

