"""The per-token divergence table of a run directory: the exact KL of the policy to its base model and the policy's
token entropy at every completion position, on a bounded sample of the run's own completions. The model forwards
live here; the metrics over the table (and their formulas) are `analysis.position_metrics`.

Models. The model of RL step s is the base at s = 0 and the run's checkpoint `checkpoints/step_s` after it, so only
step 0 and checkpointed steps are measured (`rl.checkpoint_every`; the last step always has one). The base is the
run config's `model.path`, else the pretrained built-in base in the pretraining cache
(`SpecialistsConfig.cache_dir`, under `$ECHOLAB_CACHE`), which must be there already: nothing is trained here.
A run without checkpoints (another trainer's, or one written by the TRL callback) or whose base cannot be found
has no table.

Sample. At most `DivergenceSample.steps` of those steps: the first and the last, and evenly spaced ones between;
at each, at most `DivergenceSample.completions` of the step's rollouts, drawn with `DivergenceSample.seed` (the
same rows every time). Each prompt + completion is re-tokenised from its text (the run directory keeps text, not
token ids: where a tokenizer can write a text more than one way the ids may differ from those sampled, and the
end-of-text token that ended a completion is not in its text and is not measured) and teacher-forced through the
model of its step and through the base, in batches padded on the right; at step 0 the two are the same model and
the KL is 0 by construction.

Cost and cache. Two forwards per sampled completion (one at step 0), so the cost is bounded by the sample, not by
the run: for a model of the quick preset's size (1.4M parameters), 64 completions through two models took 1.2 s of CPU
time (5.4 s wall clock on one thread of a loaded machine; batches of 8 halve the time of one by one). The table is
kept in the run directory (`specialists.run_directory.BASE_DIVERGENCE_FILE`) with the sample settings, the base
and the format set in the file's metadata, and reused while those match and no rollout file, checkpoint, base
weight or config it was computed from is newer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import ValidationError
from tqdm import tqdm

from analysis.classify import label_formats
from analysis.position_metrics import TOKEN_COLUMNS
from specialists.config import SpecialistsConfig
from specialists.errors import UserError
from specialists.files import replace_atomically
from specialists.formats import load_formats
from specialists.model import load_model
from specialists.run_directory import (BASE_DIVERGENCE_FILE, CONFIG_FILE, checkpoint_dir, rollout_file,
                                       rollout_files, step_of)
from specialists.tokenizer import load_tokenizer

METADATA_KEY = b"echolab.base_divergence"
TOKEN_SCHEMA = pa.schema([("step", pa.int64()), ("prompt_id", pa.string()), ("sample_index", pa.int64()),
                          ("format", pa.string()), ("position", pa.int64()), ("kl", pa.float64()),
                          ("entropy", pa.float64())])


@dataclass(frozen=True)
class DivergenceSample:
    """Which completions are measured: the report's cost bound."""

    steps: int = 4  # measured steps at most: the first, the last and evenly spaced ones between
    completions: int = 64  # sampled completions per measured step at most
    seed: int = 0  # the draw of the completions
    batch_size: int = 8  # sequences per forward


def base_model_of(config: dict) -> Path | None:
    """The run's base checkpoint from its resolved config: `model.path`, else the pretrained built-in base in the
    pretraining cache when it is there; None when the config names neither (another trainer's run) or the cached
    base is missing (another machine, another $ECHOLAB_CACHE)."""
    model = config.get("model")
    if not isinstance(model, dict):
        return None
    if model.get("path"):
        path = Path(model["path"])
        return path if path.is_dir() else None
    try:
        specialists = SpecialistsConfig.model_validate({name: config[name] for name in SpecialistsConfig.model_fields
                                                         if name in config})
    except (ValidationError, UserError):
        return None
    directory = specialists.cache_dir()
    return directory / "model" if (directory / "evaluation.json").is_file() else None


def measured_steps(run_dir: Path, steps: int) -> list[int]:
    """Step 0 and the checkpointed steps that have rollouts; at most `steps` of them: the first, the last and evenly
    spaced ones between."""
    available = [step for step in map(step_of, rollout_files(run_dir))
                 if step == 0 or checkpoint_dir(run_dir, step).is_dir()]
    if len(available) <= steps:
        return available
    picks = np.unique(np.linspace(0, len(available) - 1, steps).round().astype(int))
    return [available[index] for index in picks]


def token_divergence(policy: torch.nn.Module, reference: torch.nn.Module, tokenizer, prompts: list[str],
                     completions: list[str], batch_size: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """(kl_t, entropy_t) over the completion tokens of each prompt + completion (analysis.position_metrics has the
    formulas), as float64 arrays of the completion's length in tokens (empty for an empty completion). `reference`
    may be `policy` itself: one forward, and the KL is exactly 0."""
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]
    completion_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in completions]
    result = []
    with torch.no_grad():
        for begin in range(0, len(prompts), batch_size):
            sequences = [p + c for p, c in zip(prompt_ids[begin:begin + batch_size], completion_ids[begin:begin + batch_size])]
            longest = max(len(ids) for ids in sequences)
            input_ids = torch.full((len(sequences), longest), tokenizer.pad_token_id)  # (B, L), padded on the right
            attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
            for row, ids in enumerate(sequences):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention_mask[row, :len(ids)] = 1
            log_p = torch.log_softmax(policy(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1)
            log_q = log_p if reference is policy else torch.log_softmax(
                reference(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1)  # (B, L, V)
            for row in range(len(sequences)):
                prompt_length, length = len(prompt_ids[begin + row]), len(completion_ids[begin + row])
                # logits at position i predict token i + 1: the completion's tokens from position len(prompt) - 1
                span = slice(prompt_length - 1, prompt_length + length - 1)
                p, lp, lq = log_p[row, span].exp(), log_p[row, span], log_q[row, span]  # (T, V)
                kl = (p * (lp - lq)).sum(-1)  # (T,)
                entropy = -(p * lp).sum(-1)  # (T,)
                result.append((kl.double().numpy(), entropy.double().numpy()))
    return result


def divergence_tokens(run_dir: Path, base: Path, format_set: str, sample: DivergenceSample = DivergenceSample(),
                      progress: bool = True) -> pd.DataFrame:
    """The per-token table (analysis.position_metrics.TOKEN_COLUMNS) of the run's sampled completions at its
    measured steps, against `base`; formats labelled with `format_set` (the recorded `format` where present)."""
    steps = measured_steps(run_dir, sample.steps)
    formats = load_formats(format_set)
    chosen = {}
    for step in steps:
        rows = pd.read_parquet(rollout_file(run_dir, step), columns=["prompt_id", "sample_index", "prompt", "completion", "format"])
        if rows["prompt"].isna().any():
            raise UserError(f"{rollout_file(run_dir, step)}: rows without a `prompt`: the KL to the base needs the "
                            "prompt each completion was sampled from")
        if len(rows) > sample.completions:
            picked = np.random.default_rng(sample.seed).choice(len(rows), sample.completions, replace=False)
            rows = rows.iloc[np.sort(picked)]
        chosen[step] = rows.assign(format=label_formats(rows, formats)).reset_index(drop=True)
    reference, tokenizer = load_model(base).eval(), load_tokenizer(base)
    frames = []
    with tqdm(total=sum(len(rows) for rows in chosen.values()), desc="KL to base", unit=" completions",
              disable=None if progress else True) as bar:
        for step, rows in chosen.items():
            policy = reference if step == 0 else load_model(checkpoint_dir(run_dir, step)).eval()
            measured = []
            for begin in range(0, len(rows), sample.batch_size):
                batch = rows.iloc[begin:begin + sample.batch_size]
                measured += token_divergence(policy, reference, tokenizer, list(batch["prompt"]),
                                             list(batch["completion"]), sample.batch_size)
                bar.update(len(batch))
            lengths = np.array([len(kl) for kl, _ in measured], dtype=np.int64)
            frames.append(pd.DataFrame({
                "step": np.full(lengths.sum(), step, dtype=np.int64),
                "prompt_id": np.repeat(rows["prompt_id"].astype(str).to_numpy(), lengths),
                "sample_index": np.repeat(rows["sample_index"].to_numpy(dtype=np.int64), lengths),
                "format": np.repeat(rows["format"].to_numpy(dtype=object), lengths),
                "position": np.concatenate([np.arange(length) for length in lengths]) if len(lengths) else [],
                "kl": np.concatenate([kl for kl, _ in measured]) if measured else [],
                "entropy": np.concatenate([entropy for _, entropy in measured]) if measured else [],
            }))
    return pd.concat(frames, ignore_index=True)[TOKEN_COLUMNS] if frames else pd.DataFrame(columns=TOKEN_COLUMNS)


def read_base_divergence(run_dir: str | Path, format_set: str, sample: DivergenceSample = DivergenceSample(),
                         progress: bool = True) -> pd.DataFrame | None:
    """The run's per-token divergence table, from the run directory's cache when it is up to date (same sample,
    base and format set; nothing it was computed from is newer), else computed now and cached. None when the run
    has no base to compare with or no model to measure beyond the base (see the module's docstring)."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        return None
    base = base_model_of(json.loads(config_path.read_text(encoding="utf-8")))
    steps = measured_steps(run_dir, sample.steps)
    if base is None or len(steps) < 2:
        return None
    settings = json.dumps({"sample": asdict(sample), "base": str(base.resolve()), "formats": format_set, "steps": steps},
                          sort_keys=True)
    sources = [config_path, *(rollout_file(run_dir, step) for step in steps), *base.iterdir(),
               *(path for step in steps if step > 0 for path in checkpoint_dir(run_dir, step).iterdir())]
    cached = _read_cache(run_dir / BASE_DIVERGENCE_FILE, settings, max(path.stat().st_mtime for path in sources))
    if cached is not None:
        return cached
    tokens = divergence_tokens(run_dir, base, format_set, sample, progress)
    table = pa.Table.from_pandas(tokens, schema=TOKEN_SCHEMA, preserve_index=False)
    table = table.replace_schema_metadata({METADATA_KEY: settings.encode()})
    replace_atomically({run_dir / BASE_DIVERGENCE_FILE: lambda path: pq.write_table(table, path)})
    return tokens


def _read_cache(path: Path, settings: str, newest_source: float) -> pd.DataFrame | None:
    """The cached table when it was made with `settings` after every source changed last; None otherwise (or when
    it is unreadable: it is then computed afresh)."""
    if not path.is_file() or path.stat().st_mtime < newest_source:
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError):
        return None
    if (table.schema.metadata or {}).get(METADATA_KEY) != settings.encode():
        return None
    return table.to_pandas()[TOKEN_COLUMNS]
