"""One experiment end to end: pretrain (cached) -> RL post-training -> analysis -> report.

The RL base is the checkpoint at `[model] path` when the config names one (pretraining is skipped), else
the pretrained built-in model. The pretrained base is cached under `$ECHOLAB_CACHE` (default `~/.cache/echolab`)
by the hash of the config's pretraining part (`SpecialistsConfig.base_identity`, which includes the bytes of any
corpus files), so runs that share a base (seeds of RL aside) reuse it. A killed run
continues with `resume=True` from its last checkpoint; the steps after it are redone and recorded
again (their partial records are dropped first), so no step is lost or doubled. Every file of the run
directory is written whole or not at all (temporary file, then rename), except metrics.jsonl, which
is appended one line per write (a cut last line is dropped on resume).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from experiments.config import ExperimentConfig
from specialists.config import SpecialistsConfig
from specialists.errors import UserError


def base_model_dir(config: SpecialistsConfig, progress: bool = True) -> Path:
    """The pretrained checkpoint for this pretraining config, trained on first use."""
    from specialists.evaluate import evaluate
    from specialists.pretrain import pretrain

    directory = config.cache_dir()
    if (directory / "evaluation.json").is_file():
        return directory / "model"
    partial = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    model_dir = pretrain(config, partial, progress=progress)
    evaluate(model_dir, config, partial / "evaluation.json", progress=progress)
    shutil.rmtree(directory, ignore_errors=True)
    partial.replace(directory)
    return directory / "model"


def base_model(config: ExperimentConfig, progress: bool = True) -> Path:
    """The RL base: the checkpoint at model.path, or the pretrained built-in model (trained on first use)."""
    return Path(config.model.path) if config.model.path else base_model_dir(config.specialists(), progress)


def _same_config(saved: dict, resolved: dict) -> bool:
    """Whether a run directory's config.json `saved` is the config `resolved`: equal, except that a setting
    echolab gained after the run started (absent from `saved`) may be in `resolved` at its default value."""
    def same(saved, resolved, defaults) -> bool:
        if not isinstance(saved, dict) or not isinstance(resolved, dict):
            return saved == resolved
        defaults = defaults if isinstance(defaults, dict) else {}
        return not set(saved) - set(resolved) and all(
            same(saved[key], value, defaults.get(key)) if key in saved else key in defaults and defaults[key] == value
            for key, value in resolved.items())

    return same(saved, resolved, ExperimentConfig().model_dump(mode="json"))


def _prepare_run_dir(run_dir: Path, resolved: dict, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: a non-empty `run_dir` needs `resume` (and the same config) or `overwrite`."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory")
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            shutil.rmtree(run_dir)
        elif not resume:
            raise UserError(f"{run_dir} is not empty: pass --resume to continue it, --overwrite to start it "
                            "afresh, or choose another --out")
        elif not (run_dir / "config.json").is_file():
            raise UserError(f"{run_dir} has no config.json, so it is no run to resume")
        elif not _same_config(json.loads((run_dir / "config.json").read_text()), resolved):
            raise UserError(f"{run_dir} was started with a different config; resume it with the same one")
    elif resume:
        raise UserError(f"nothing to resume in {run_dir}")


def _tracker_observer(config: ExperimentConfig, run_dir: Path, resolved: dict, start_step: int, seed: int):
    """The driver's step observer feeding `[logging] report_to` (experiments.trackers). A resumed run's collapse
    watch starts from the rollouts of the steps before `start_step` (the later ones are redone)."""
    import pandas as pd

    from analysis.classify import format_names
    from analysis.live import CollapseWatch
    from analysis.sources import read_rollouts
    from experiments.trackers import TrackerObserver, open_trackers
    from specialists.formats import load_formats

    names = format_names(load_formats(config.analysis.formats), pd.Series([], dtype=object))
    watch = CollapseWatch(names, last_step=config.rl.steps, threshold=config.analysis.collapse_threshold, seed=seed)
    if start_step > 0:
        earlier = read_rollouts(run_dir)
        watch.restore(earlier[earlier["step"] < start_step])
    trackers = open_trackers(config.logging.report_to, run_dir, config.logging.project, resolved, start_step)
    return TrackerObserver(trackers, watch)


def run_experiment(config: ExperimentConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
                   progress: bool = True, observers: Sequence = (), processes: int = 1) -> Path:
    """Run (or resume) the experiment into `run_dir`; returns the path of the report.

    A non-empty `run_dir` is refused unless `resume` (same config; continues from the last checkpoint) or
    `overwrite` (deletes it first). A reward or loss that turns NaN or infinite stops the run with a
    UserError naming the step and the last good checkpoint. `observers` (rl.recipe.StepObserver) see each
    step once it is recorded (the CLI's step-0 check and per-step line, experiments.console).

    `processes` > 1: data-parallel RL (rl.distributed) in that many processes started here (`launch`), each with
    its own engine and a share of the cores; rank 0 records, and runs the observers (in its process). Settings
    that cannot be split are refused before any work (rl.config.split_problem).
    """
    from rl.config import split_problem
    from rl.recorder import Recorder

    if processes > 1 and (problem := split_problem(config.rl, processes)):
        raise UserError(f"--processes {processes}: {problem}")
    run_dir = Path(run_dir)
    resolved = config.model_dump(mode="json")
    _prepare_run_dir(run_dir, resolved, resume, overwrite)
    recorder = Recorder(run_dir)  # an unwritable --out fails here, before the pretraining
    recorder.write_config(resolved)

    from analysis.report import write_report
    from analysis.summary import analyze
    from rl.recipe import NonFiniteError

    base = base_model(config, progress)
    start_step, weights = 0, base
    last = recorder.last_checkpoint() if resume else None
    if last is not None:  # the driver reads the optimiser and RNG state from the checkpoint itself
        start_step, weights = last
    if resume:  # --quiet or not: where a resumed run starts is what its user checks first
        from experiments.console import print_above_bars

        print_above_bars(f"resuming {run_dir} at step {start_step} from "
                         + (str(weights) if last is not None else "the base model"))
    job = RLJob(config, run_dir, base, weights, start_step, progress, list(observers))
    try:
        if processes == 1:
            job.train()
        else:
            launch(job, processes)
    except NonFiniteError as error:
        last = recorder.last_checkpoint()
        kept = f"the last good checkpoint is {last[1]}" if last else "no checkpoint was written"
        raise UserError(f"{error}; the run stopped and {kept} (resuming would diverge again: change the config, "
                        "e.g. a lower learning rate)") from None
    analyze(run_dir, formats=config.analysis.formats, collapse_threshold=config.analysis.collapse_threshold, progress=progress)
    return write_report([run_dir], run_dir / "report.html")


@dataclass
class RLJob:
    """The RL part of one experiment, as each process runs it: `weights` (the base, or the checkpoint of
    `start_step` on a resume) trained into `run_dir`."""

    config: ExperimentConfig
    run_dir: Path
    base: Path
    weights: Path
    start_step: int
    progress: bool
    observers: list

    def train(self, shard=None) -> None:
        """Build the run (model, engine, prompts, rewards) and train it; `shard` (rl.distributed.Shard): this
        process's place in a data-parallel run, None for one process. Only rank 0 feeds trackers and observers."""
        import torch

        from rl.distributed import Shard
        from rl.engines import make_engine
        from rl.recipe import Run, needs_base_model
        from rl.recorder import Recorder
        from rl.replay import PretrainReplay
        from rl.rollouts import PromptSet, Rewards, load_heldout_problems, load_prompt_problems
        from rl.training import train
        from specialists.formats import load_formats
        from specialists.model import load_model
        from specialists.pretrain import build_corpus
        from specialists.prompting import Prompter
        from specialists.sandbox import Sandbox
        from specialists.tokenizer import load_tokenizer

        config, settings, shard = self.config, self.config.rl, shard or Shard()
        seed = config.seed if settings.seed is None else settings.seed
        torch.manual_seed(seed)
        model, tokenizer = load_model(self.weights), load_tokenizer(self.weights)
        problems = load_prompt_problems(settings, seed, config.task)
        heldout = load_heldout_problems(settings, config.seed, config.task) if settings.evaluation.every > 0 else []
        prompter = Prompter(tokenizer, settings.prompt_template, settings.chat_template)
        replay = None
        if settings.mitigations.pretrain_replay_coef > 0:  # the config refuses it with a model.path base
            texts = [example.text for example in build_corpus(config.specialists())]
            replay = PretrainReplay.from_texts(texts, tokenizer, settings.mitigations.pretrain_replay_batch, seed)
        engine = make_engine(settings.engine, self.weights, model, tokenizer, config.model.max_length, seed)
        observers = []
        if shard.leads:
            resolved = config.model_dump(mode="json")
            observers = [*self.observers, _tracker_observer(config, self.run_dir, resolved, self.start_step, seed)]
        try:
            with Sandbox() as sandbox:
                rewards = Rewards(load_formats(config.mixture.format_set), sandbox, settings.reward_scale,
                                  settings.mitigations.format_diversity_coef)
                train(Run(settings=settings, model=model, tokenizer=tokenizer, engine=engine,
                          prompt_set=PromptSet(problems, settings.prompts_per_step, seed, prompter), rewards=rewards,
                          recorder=Recorder(self.run_dir), seed=seed, start_step=self.start_step,
                          reference=load_model(self.base) if needs_base_model(settings) else None, replay=replay,
                          heldout=heldout, progress=self.progress and shard.leads, shard=shard), observers)
        finally:
            for observer in observers[len(self.observers):]:
                observer.close()
            engine.close()


def launch(job: RLJob, processes: int) -> None:
    """Train `job` data-parallel in `processes` new processes (torch.multiprocessing, "spawn"), each given the
    variables torch.distributed.run (torchrun) gives its workers: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE. The
    cores this process may use (torch.get_num_threads()) are split evenly between them. Returns when all have
    finished; an error in one ends the others, and a UserError (a NaN step, say) is raised here as it was raised
    there. The processes die with this one (Linux: PR_SET_PDEATHSIG), so a killed run leaves none behind."""
    import socket

    import torch
    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the rendezvous store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    threads = max(1, torch.get_num_threads() // processes)
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(_rank_main, args=(job, processes, port, threads, errors), nprocs=processes,
                           start_method="spawn")
    except (mp.ProcessExitedException, mp.ProcessRaisedException):
        if not errors.empty():
            raise errors.get() from None
        raise


def _rank_main(rank: int, job: RLJob, processes: int, port: int, threads: int, errors) -> None:
    """One data-parallel process: join the run, then train its share (see `launch`)."""
    import ctypes
    import signal

    import torch

    from experiments.console import silence_libraries
    from rl.distributed import Shard

    if sys.platform.startswith("linux"):  # die with the launcher (PR_SET_PDEATHSIG = 1)
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    silence_libraries()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(processes))
    try:
        # gloo: the pipeline keeps the models on the CPU (README, "Several processes / the GPU route": NCCL goes with
        # placing each rank's model on its GPU)
        job.train(Shard.from_environment("gloo"))
    except UserError as error:
        errors.put(error)
        raise SystemExit(1) from None
