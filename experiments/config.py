"""Loading TOML configs into the typed config models, with errors that name the bad key and the allowed ones."""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from rl.config import RLSettings
from specialists.config import SpecialistsConfig, Strict
from specialists.errors import UserError


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not a config file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (not UTF-8)") from None
    except tomllib.TOMLDecodeError as error:  # its message ends with "(at line L, column C)"
        raise UserError(f"{path}: not valid TOML ({error})") from None


def check_keys(document: dict, model: type[BaseModel], source: str, where: str = "") -> None:
    """Reject keys the model does not define, naming `source`, them and the allowed ones (recursing into sections)."""
    allowed = model.model_fields
    unknown = sorted(set(document) - set(allowed))
    if unknown:
        keys = ", ".join(where + key for key in unknown)
        raise UserError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {keys}; "
                        f"allowed in {where.rstrip('.') or 'the top level'}: {', '.join(sorted(allowed))}")
    for key, value in document.items():
        annotation = allowed[key].annotation
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            check_keys(value, annotation, source, f"{where}{key}.")
        elif isinstance(value, dict) and typing.get_origin(annotation) is dict:
            value_type = typing.get_args(annotation)[1]
            if isinstance(value_type, type) and issubclass(value_type, BaseModel):
                for name, entry in value.items():
                    if isinstance(entry, dict):
                        check_keys(entry, value_type, source, f"{where}{key}.{name}.")


def validate(document: dict, model: type[BaseModel], source: str):
    check_keys(document, model, source)
    try:
        return model.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators' messages
        if isinstance(first["input"], (str, int, float)):  # a section's input is the whole table: not worth quoting
            message += f" (got {first['input']!r})"
        raise UserError(f"{source}: {location + ': ' if location else ''}{message}") from None


class AnalysisSettings(Strict):
    formats: str = Field("synthetic", description="format set name or a TOML/YAML format file")
    collapse_threshold: float = Field(0.9, gt=0, le=1)


class LoggingSettings(Strict):
    """Where each step's metrics go while the run goes (experiments.trackers), besides the run directory."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=lambda: ["tensorboard"], description=(
        "trackers fed after every step: tensorboard (event files in RUN/tensorboard/), wandb (offline in RUN/wandb/ "
        "unless WANDB_MODE says otherwise), mlflow (RUN/mlflow.db unless MLFLOW_TRACKING_URI says otherwise); "
        "wandb and mlflow need `pip install -e \".[trackers]\"`"))
    project: str = Field("echolab", min_length=1, description="the wandb project and the MLflow experiment")


class ExperimentConfig(SpecialistsConfig):
    """A whole experiment: the base model (the SpecialistsConfig fields), RL post-training and analysis."""

    name: str = "experiment"
    rl: RLSettings = RLSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _base_model_and_rl_agree(self) -> "ExperimentConfig":
        if self.model.path is not None and self.rl.mitigations.pretrain_replay_coef > 0:
            raise ValueError("rl.mitigations.pretrain_replay_coef replays the pretraining corpus, which a "
                             "model.path base does not have here")
        if self.model.path is None and self.rl.chat_template:
            raise ValueError("rl.chat_template needs a model.path base with a chat template; "
                             "the pretrained built-in models have none")
        return self

    def specialists(self) -> SpecialistsConfig:
        """The part that determines the pretrained base model (its cache key)."""
        return SpecialistsConfig(**{name: getattr(self, name) for name in SpecialistsConfig.model_fields})


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    return validate(read_toml(path), ExperimentConfig, str(path))
