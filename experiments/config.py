"""Loading TOML configs into the typed config models, with errors a user can act on.

Every rule of a config lives in the typed models' validators (rl.config, specialists.config and
`ExperimentConfig` below), so a config is refused when it is loaded, before any work. An error names
the file and the line of the offending key (tomllib gives no positions: `TomlFile.line_of` finds them),
the key, and for a mistyped key or value the closest allowed one:

    config.toml line 12: unknown key rl.stpes (did you mean rl.steps?); allowed in rl: algorithm, ...
    config.toml line 20: rl: mitigations.kl_cov needs grpo.num_iterations > 1: ...
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from rl.config import RLSettings
from specialists.config import SpecialistsConfig, Strict, check_problem_space
from specialists.errors import SettingsError, UserError, closest

KeyPath = tuple[str, ...]
# Where in the user's files the first of some key paths is written: "config.toml line 12", or "config.toml".
Where = Callable[[Sequence[KeyPath]], str]


@dataclass(frozen=True)
class TomlFile:
    """A parsed TOML file that can say on which line a key is."""

    path: Path
    text: str
    document: dict

    def line_of(self, key: KeyPath) -> int | None:
        """The line (1-based) where `key` (a path of table and key names) is written: its `key = ...` line,
        its `[table]` header, or the line of the dotted key or inline table that creates it; None if the file
        does not set it. tomllib reports no positions, so each line-end prefix of the text is parsed: the
        first one holding the key ends the statement that set it, which begins at the first line (not blank
        or a comment) after the previous prefix that parsed (a multi-line array or string does not parse
        half-way)."""
        if not _holds(self.document, key):
            return None
        lines = self.text.splitlines(keepends=True)
        boundary = 0  # lines in the last prefix that parsed
        for end in range(1, len(lines) + 1):
            try:
                prefix = tomllib.loads("".join(lines[:end]))
            except tomllib.TOMLDecodeError:
                continue
            if _holds(prefix, key):
                for number in range(boundary, end):
                    if lines[number].strip() and not lines[number].lstrip().startswith("#"):
                        return number + 1
            boundary = end
        return None

    def where(self, keys: Sequence[KeyPath]) -> str:
        """`path line N` for the first of `keys` the file sets, else `path`."""
        for key in keys:
            line = self.line_of(key)
            if line is not None:
                return f"{self.path} line {line}"
        return str(self.path)


def _holds(document, key: KeyPath) -> bool:
    for part in key:
        if not isinstance(document, dict) or part not in document:
            return False
        document = document[part]
    return True


def read_toml(path: str | Path) -> TomlFile:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a config file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        return TomlFile(path, text, tomllib.loads(text))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (not UTF-8)") from None
    except tomllib.TOMLDecodeError as error:  # its message ends with "(at line L, column C)"
        raise UserError(f"{path}: not valid TOML ({error})") from None


def dotted(key: KeyPath) -> str:
    return ".".join(str(part) for part in key)


def check_keys(document: dict, model: type[BaseModel], where: Where, prefix: KeyPath = ()) -> None:
    """Reject keys the model does not define (recursing into sections), naming where the first is, each of them
    with the closest allowed key, and the allowed ones."""
    allowed = model.model_fields
    unknown = [key for key in document if key not in allowed]
    if unknown:
        names = []
        for key in unknown:
            suggestion = closest(key, allowed)
            hint = f" (did you mean {dotted(prefix + (suggestion,))}?)" if suggestion else ""
            names.append(dotted(prefix + (key,)) + hint)
        raise UserError(f"{where([prefix + (key,) for key in unknown])}: unknown key{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(names)}; allowed in {dotted(prefix) or 'the top level'}: {', '.join(sorted(allowed))}")
    for key, value in document.items():
        annotation = allowed[key].annotation
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            check_keys(value, annotation, where, prefix + (key,))
        elif isinstance(value, dict) and typing.get_origin(annotation) is dict:
            value_type = typing.get_args(annotation)[1]
            if isinstance(value_type, type) and issubclass(value_type, BaseModel):
                for name, entry in value.items():
                    if isinstance(entry, dict):
                        check_keys(entry, value_type, where, prefix + (key, name))


def validate(document: dict, model: type[BaseModel], where: Where):
    """`model` built from `document`, or one UserError: where the offending key is, the key, the problem."""
    check_keys(document, model, where)
    try:
        return model.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        location = tuple(str(part) for part in first["loc"])
        cause = first.get("ctx", {}).get("error")
        keys = [location + tuple(key.split(".")) for key in cause.keys] if isinstance(cause, SettingsError) else []
        keys += [location[:end] for end in range(len(location), 0, -1)]  # else the key, else its section
        # pydantic's own message, or ours without the "Value error, " pydantic puts before a validator's ValueError
        message = str(cause) if isinstance(cause, UserError) else first["msg"].removeprefix("Value error, ")
        if not isinstance(cause, UserError) and isinstance(first["input"], (str, int, float)):
            got = f"got {first['input']!r}"  # a section's input is the whole table: not worth quoting
            suggestion = (closest(str(first["input"]), re.findall(r"'([^']*)'", first["ctx"]["expected"]))
                          if first["type"] == "literal_error" else None)
            got += f"; did you mean {suggestion!r}?" if suggestion else ""
            message += f" ({got})"
        raise UserError(f"{where(keys)}: {dotted(location) + ': ' if location else ''}{message}") from None


class AnalysisSettings(Strict):
    formats: str = Field("synthetic", description="format set: 'synthetic', 'echo-chamber', or a TOML/YAML format "
                                                  "file (specialists.formats.load_formats)")
    collapse_threshold: float = Field(0.9, gt=0, le=1, description="dominant format share that counts as collapse")

    @field_validator("formats")
    @classmethod
    def _resolves(cls, value: str) -> str:
        from specialists.formats import load_formats

        load_formats(value)  # a built-in set name or a readable format file
        return value


TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # report_to name -> its module


class LoggingSettings(Strict):
    """Where each step's metrics go while the run goes (experiments.trackers), besides the run directory."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"], description=(
        "trackers fed after every step: tensorboard (event files in RUN/tensorboard/), wandb (offline in RUN/wandb/ "
        "unless WANDB_MODE says otherwise), mlflow (RUN/mlflow.db unless MLFLOW_TRACKING_URI says otherwise); "
        "wandb and mlflow need `pip install -e \".[trackers]\"`"))
    project: str = Field("echolab", min_length=1, description="the wandb project and the MLflow experiment")

    @field_validator("report_to")
    @classmethod
    def _installed(cls, value: list[str]) -> list[str]:
        missing = [name for name in value if importlib.util.find_spec(TRACKER_MODULES[name]) is None]
        if missing:
            raise SettingsError(f"{missing[0]} is not installed (pip install -e \".[trackers]\")")
        return value


class ExperimentConfig(SpecialistsConfig):
    """A whole experiment: the base model (the SpecialistsConfig fields), RL post-training and analysis."""

    name: str = "experiment"
    rl: RLSettings = RLSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    logging: LoggingSettings = LoggingSettings()

    def specialists(self) -> SpecialistsConfig:
        """The part that determines the pretrained base model (its cache key)."""
        return SpecialistsConfig(**{name: getattr(self, name) for name in SpecialistsConfig.model_fields})

    @model_validator(mode="after")
    def _rl_fits_the_model(self) -> "ExperimentConfig":
        """Rules between RL and the base model (RL's own rules are RLSettings'; the model's, ModelSettings'). A
        model.path base is checked here, before any work: a supported family vLLM serves exactly, with the
        positions for model.max_length and a chat template when rl.chat_template asks for one
        (specialists.families reads two small JSON files)."""
        from specialists.families import checkpoint_family, has_chat_template

        rl, path = self.rl, self.model.path
        if rl.prompts == "synthetic":
            check_problem_space(self.task, "train", rl.num_prompts, "rl.num_prompts")
            if rl.evaluation.every > 0:
                check_problem_space(self.task, "eval", rl.evaluation.num_problems, "rl.evaluation.num_problems")
        if path is None and rl.chat_template:
            raise SettingsError("rl.chat_template needs a model.path base with a chat template; the pretrained "
                                "built-in models have none", "rl.chat_template")
        if path is not None and rl.mitigations.pretrain_replay_coef > 0:
            raise SettingsError("rl.mitigations.pretrain_replay_coef replays the pretraining corpus, which a "
                                "model.path base does not have here", "rl.mitigations.pretrain_replay_coef",
                                "model.path")
        if path is None:
            router, why, model_key = self.model.kind in ("moe", "btx"), "model.kind = 'dense'", "model.kind"
        else:
            try:
                family, checkpoint = checkpoint_family(path)
            except UserError as error:
                raise SettingsError(str(error), "model.path") from None
            positions = checkpoint.get("max_position_embeddings")
            if positions is not None and self.model.max_length > positions:
                raise SettingsError(f"model.max_length ({self.model.max_length}) exceeds the {positions} positions of "
                                    f"the checkpoint at model.path (its max_position_embeddings)", "model.max_length",
                                    "model.path")
            if rl.chat_template and not has_chat_template(path):
                raise SettingsError(f"rl.chat_template: the tokenizer in {path} has no chat template",
                                    "rl.chat_template", "model.path")
            router, why, model_key = family.mixture_of_experts, f"model.path is a dense {family.name}", "model.path"
        if not router and rl.mitigations.freeze_router:
            raise SettingsError(f"rl.mitigations.freeze_router needs a model with a router ({why})",
                                "rl.mitigations.freeze_router", model_key)
        if not router and rl.router_aux_loss_coef is not None:
            raise SettingsError(f"rl.router_aux_loss_coef needs a model with a router ({why})",
                                "rl.router_aux_loss_coef", model_key)
        return self


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """The config of a TOML file, every rule checked; a problem is one UserError naming the file, line and key."""
    file = read_toml(path)
    return validate(file.document, ExperimentConfig, file.where)
