"""One experiment end to end: pretrain (cached) -> RL post-training -> analysis -> report.

The pretrained base is cached under `$ECHOLAB_CACHE` (default `~/.cache/echolab`) by the hash of the
config's pretraining part, so runs that share a base (seeds of RL aside) reuse it. A killed run
continues with `resume=True` from its last checkpoint; the steps after it are redone and recorded
again (their partial records are dropped first), so no step is lost or doubled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from experiments.config import ExperimentConfig
from specialists.config import SpecialistsConfig
from specialists.errors import UserError


def cache_root() -> Path:
    return Path(os.environ.get("ECHOLAB_CACHE", Path.home() / ".cache" / "echolab"))


def base_model_dir(config: SpecialistsConfig, progress: bool = True) -> Path:
    """The pretrained checkpoint for this pretraining config, trained on first use."""
    from specialists.evaluate import evaluate
    from specialists.pretrain import pretrain

    key = hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_root() / "pretrain" / key
    if (directory / "evaluation.json").is_file():
        return directory / "model"
    partial = directory.with_name(key + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    model_dir = pretrain(config, partial, progress=progress)
    evaluate(model_dir, config, partial / "evaluation.json", progress=progress)
    shutil.rmtree(directory, ignore_errors=True)
    partial.replace(directory)
    return directory / "model"


def _check_input_files(config: ExperimentConfig) -> None:
    from specialists.formats import load_formats

    if config.rl.prompts != "synthetic" and not Path(config.rl.prompts).is_file():
        raise UserError(f"rl.prompts: file not found: {config.rl.prompts}")
    load_formats(config.analysis.formats)  # a built-in set name or a readable format file


def run_experiment(config: ExperimentConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) the experiment into `run_dir`; returns the path of the report."""
    import torch

    from analysis.report import write_report
    from analysis.summary import analyze
    from rl.engines import make_engine
    from rl.recorder import Recorder
    from rl.rollouts import PromptSet, Rewards, load_prompt_problems
    from rl.train import train
    from specialists.formats import FORMAT_SETS
    from specialists.pretrain import build_corpus
    from specialists.model import load_model
    from specialists.sandbox import Sandbox
    from specialists.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    resolved = config.model_dump(mode="json")
    _check_input_files(config)  # before any work: a typo must not cost a pretraining
    if run_dir.exists() and any(run_dir.iterdir()):
        if not resume:
            raise UserError(f"{run_dir} is not empty: pass --resume to continue it, or choose another --out")
        recorded = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else None
        if recorded != resolved:
            raise UserError(f"{run_dir} was started with a different config; resume it with the same one")
    elif resume:
        raise UserError(f"nothing to resume in {run_dir}")

    base = base_model_dir(config.specialists(), progress)
    recorder = Recorder(run_dir)
    recorder.write_config(resolved)
    start_step, weights = 0, base
    last = recorder.last_checkpoint() if resume else None
    if last is not None:  # the trainers read the optimiser and RNG state from the checkpoint themselves
        start_step, weights = last

    seed = config.seed if config.rl.seed is None else config.rl.seed
    torch.manual_seed(seed)
    model, tokenizer = load_model(weights), load_tokenizer(weights)
    problems = load_prompt_problems(config.rl, seed, config.task.task_config())
    prompt_set = PromptSet(problems, config.rl.prompts_per_step, seed)
    engine = make_engine(config.rl.engine, weights, model, tokenizer, config.model.max_length, seed)
    try:
        with Sandbox() as sandbox:
            rewards = Rewards(FORMAT_SETS["synthetic"], sandbox, config.rl.reward_scale, config.rl.mitigations.format_diversity_coef)
            train(config.rl, model=model, tokenizer=tokenizer, engine=engine, prompt_set=prompt_set, rewards=rewards,
                  recorder=recorder, seed=seed, base_model_dir=base, start_step=start_step, progress=progress,
                  replay_texts=[e.text for e in build_corpus(config.specialists())]
                  if config.rl.mitigations.pretrain_replay_coef > 0 else None)
    finally:
        engine.close()
    analyze(run_dir, formats=config.analysis.formats, collapse_threshold=config.analysis.collapse_threshold, progress=progress)
    return write_report([run_dir], run_dir / "report.html")
