"""Wall time of one GRPO step: ours (rl.grpo, rollouts from our engine) against stock TRL GRPOTrainer
(transformers generation inside the trainer, no rollout_func), in the same process and on the same model,
prompts, samples and lengths.

A step is timed from one `on_step_begin` to the next (the last one to `on_train_end`), so it covers
sampling, grading (the same sandboxed `rl.rollouts.Rewards` for both), the loss forward/backward, the
optimiser update and, for ours, the recording of rollouts, router statistics and metrics. Each side runs
`--warmup` steps, then `--steps` measured ones, then one unmeasured step (ours writes its final
checkpoint there); the median of the measured ones is reported. The machine
is shared, so the two sides alternate in `--rounds` rounds (ours, stock, ours, stock, ...) and the
medians are over all rounds. Prints one JSON line.

    python bench/rl_step.py [--engine vllm|hf] [--model DIR] [--prompts 8] [--samples 8] [--max-new-tokens 96]
                            [--warmup 2] [--steps 5] [--rounds 1]

Without `--model`, a tiny MoE is pretrained first (`--pretrain-examples`, default 2000; not timed).
`--engine vllm` builds the engine with `rl.engines.make_engine`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds from each on_step_begin to the next one (the last step: to on_train_end)."""

        def __init__(self):
            self.times: list[float] = []
            self._begin: float | None = None

        def _close(self):
            if self._begin is not None:
                self.times.append(time.perf_counter() - self._begin)

        def on_step_begin(self, args, state, control, **kwargs):
            self._close()
            self._begin = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self._close()
            self._begin = None

    return StepTimer()


def _engine(kind: str, model_dir: Path, model, tokenizer, seed: int):
    from rl.config import EngineSettings
    from rl.engines import make_engine

    return make_engine(EngineSettings(kind=kind), model_dir, model, tokenizer,
                       max_length=model.config.max_position_embeddings, seed=seed)


def run_ours(model_dir: Path, settings, problems, rewards, engine_kind: str, seed: int, steps: int):
    from rl.grpo import train_grpo
    from rl.recorder import Recorder
    from rl.rollouts import PromptSet
    from specialists.model import load_model
    from specialists.tokenizer import load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    engine = _engine(engine_kind, model_dir, model, tokenizer, seed)
    timer = _step_timer()
    try:
        with tempfile.TemporaryDirectory(prefix="rl-step-bench-") as run_dir:
            train_grpo(model, tokenizer, engine, PromptSet(problems, len(problems), seed), rewards,
                       settings.model_copy(update={"steps": steps}), Recorder(run_dir), seed, progress=False,
                       callbacks=[timer])
            metrics = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    finally:
        engine.close()
    return timer.times, metrics


def run_stock_trl(model_dir: Path, settings, problems, rewards, seed: int, steps: int):
    import datasets
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    from rl.grpo import grpo_config
    from specialists.model import is_moe, load_model
    from specialists.tasks import prompt_text
    from specialists.tokenizer import load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    samples = settings.sampling.samples_per_prompt

    def echolab_reward(prompts, completions, answer, **kwargs):
        return rewards(list(completions), list(answer), samples)[0].tolist()

    dataset = datasets.Dataset.from_dict({"prompt": [prompt_text(p) for p in problems],
                                          "answer": [float(p.answer) for p in problems]})
    timer = _step_timer()
    with tempfile.TemporaryDirectory(prefix="rl-step-bench-trl-") as out:
        args = grpo_config(settings, seed, out, max_steps=steps, moe=is_moe(model))
        trainer = GRPOTrainer(model=model, reward_funcs=[echolab_reward], args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # keep stdout to the one JSON line
        trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history if "completions/mean_length" in entry]
    return timer.times, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--model", type=Path, help="HF checkpoint directory (default: pretrain a tiny MoE first)")
    parser.add_argument("--pretrain-examples", type=int, default=2000)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per side and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    # Libraries (vLLM, transformers) print to stdout; keep it for the one JSON line.
    stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        result = measure(options)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
    print(json.dumps(result))


def measure(options) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    from rl.config import RLSettings, SamplingSettings
    from rl.rollouts import Rewards
    from specialists.config import PretrainSettings, SpecialistsConfig
    from specialists.formats import FORMAT_SETS
    from specialists.pretrain import pretrain
    from specialists.sandbox import Sandbox
    from specialists.tasks import TaskSettings, generate_problems

    with tempfile.TemporaryDirectory(prefix="rl-step-bench-model-") as scratch:
        model_dir = options.model
        if model_dir is None:
            config = SpecialistsConfig(seed=options.seed, pretrain=PretrainSettings(num_examples=options.pretrain_examples))
            model_dir = pretrain(config, Path(scratch), progress=False)
        settings = RLSettings(steps=options.warmup + options.steps, prompts_per_step=options.prompts,
                              checkpoint_every=10**6,
                              sampling=SamplingSettings(samples_per_prompt=options.samples,
                                                        max_new_tokens=options.max_new_tokens))
        problems = generate_problems(options.prompts, options.seed + 10_000, "train", TaskSettings())
        # one trailing step per side is run but not measured: ours saves its final checkpoint there
        total = options.warmup + options.steps + 1
        measured = slice(options.warmup, options.warmup + options.steps)
        ours, stock, our_metrics, stock_lengths = [], [], [], []
        with Sandbox(workers=1) as sandbox:
            rewards = Rewards(FORMAT_SETS["synthetic"], sandbox, settings.reward_scale, 0.0)
            for _ in range(options.rounds):
                times, metrics = run_ours(model_dir, settings, problems, rewards, options.engine, options.seed, total)
                ours += times[measured]
                our_metrics += metrics[measured]
                times, lengths = run_stock_trl(model_dir, settings, problems, rewards, options.seed, total)
                stock += times[measured]
                stock_lengths += lengths[measured]

    result = {
        "echolab_step_s": round(statistics.median(ours), 3),
        "trl_step_s": round(statistics.median(stock), 3),
        "speedup": round(statistics.median(stock) / statistics.median(ours), 2),
        "engine": options.engine,
        "echolab_rollout_s": round(statistics.median(m["rollout_time_s"] for m in our_metrics), 3),
        "echolab_rollout_tokens_per_s": round(statistics.median(m["rollout_tokens_per_s"] for m in our_metrics), 1),
        "echolab_mean_completion_tokens": round(statistics.mean(m["completions/mean_length"] for m in our_metrics), 1),
        "trl_mean_completion_tokens": round(statistics.mean(stock_lengths), 1),
        "echolab_step_s_all": [round(t, 3) for t in ours],
        "trl_step_s_all": [round(t, 3) for t in stock],
        "prompts": options.prompts, "samples": options.samples, "max_new_tokens": options.max_new_tokens,
        "warmup": options.warmup, "steps": options.steps, "rounds": options.rounds,
        "torch_threads": torch.get_num_threads(), "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    return result


if __name__ == "__main__":
    main()
