"""Wall time of one GRPO step: ours (rl.grpo through rl.training.train, rollouts from our engine) against stock
TRL GRPOTrainer (transformers generation inside the trainer), in the same process and on the same model,
prompts, samples, lengths and GRPO settings.

A step is timed from the end of one step to the end of the next, so it covers sampling, grading (the same
sandboxed `rl.rollouts.Rewards` for both), the loss forward/backward, the optimiser update and, for ours, the
weight sync and the recording of rollouts, router statistics and metrics: ours between consecutive step
observer calls (rl.recipe.StepObserver), TRL's between consecutive `on_step_end` callbacks. Each side runs
`--warmup` steps, then `--steps` measured ones, then one unmeasured step (ours writes its final checkpoint
and samples the final model there); the median of the measured ones is reported, with ours split into
sampling, scoring, the update (forwards, backward, optimiser) and the sync, from its metrics lines. The
machine is shared and its load moves, so the two sides alternate in `--rounds` rounds (ours, stock, ours,
stock, ...): `ratio` is the median over rounds of each round's ratio of medians (a paired comparison of
runs minutes apart), the step times are medians over all rounds. Prints one JSON line.

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

SPLIT = ("sample_time_s", "score_time_s", "update_time_s", "sync_time_s")


class StepClock:
    """Seconds between consecutive step ends (the first from `start`); as a step observer and a TRL callback."""

    def __init__(self):
        self.times: list[float] = []
        self.start()

    def start(self):
        self._last = time.perf_counter()

    def _tick(self):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now

    def on_step(self, step, rollouts, metrics):  # rl.recipe.StepObserver
        self._tick()

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Tick(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.start()

            def on_step_end(self, args, state, control, **kwargs):
                clock._tick()

        return Tick()


def run_ours(model_dir: Path, settings, problems, rewards, engine_kind: str, seed: int):
    from rl.config import EngineSettings
    from rl.engines import make_engine
    from rl.recipe import Run
    from rl.recorder import Recorder
    from rl.rollouts import PromptSet
    from rl.training import train
    from specialists.model import load_model
    from specialists.prompting import Prompter
    from specialists.tokenizer import load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    engine = make_engine(EngineSettings(kind=engine_kind), model_dir, model, tokenizer,
                         max_length=model.config.max_position_embeddings, seed=seed)
    clock = StepClock()
    try:
        with tempfile.TemporaryDirectory(prefix="rl-step-bench-") as run_dir:
            run = Run(settings=settings, model=model, tokenizer=tokenizer, engine=engine,
                      prompt_set=PromptSet(problems, len(problems), seed, Prompter(tokenizer)), rewards=rewards,
                      recorder=Recorder(run_dir), seed=seed, progress=False)
            clock.start()
            train(run, observers=[clock])
            metrics = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    finally:
        engine.close()
    return clock.times, metrics


def run_stock_trl(model_dir: Path, settings, problems, rewards, seed: int, steps: int):
    import datasets
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from specialists.model import load_model
    from specialists.tasks import prompt_text
    from specialists.tokenizer import load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    samples = settings.sampling.samples_per_prompt

    def echolab_reward(prompts, completions, answer, **kwargs):
        return rewards(list(completions), list(answer), samples)[0].tolist()

    dataset = datasets.Dataset.from_dict({"prompt": [prompt_text(p) for p in problems],
                                          "answer": [float(p.answer) for p in problems]})
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="rl-step-bench-trl-") as out:
        # The same GRPO as ours: one optimiser step per generation batch of prompts x samples, float32 on CPU.
        args = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1,
            disable_tqdm=True, seed=seed, max_steps=steps, learning_rate=settings.learning_rate,
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
            per_device_train_batch_size=len(problems) * samples, gradient_accumulation_steps=1, steps_per_generation=1,
            num_generations=samples, num_iterations=settings.grpo.num_iterations,
            max_completion_length=settings.sampling.max_new_tokens, temperature=settings.sampling.temperature,
            top_p=settings.sampling.top_p, top_k=0, loss_type=settings.grpo.loss_type, beta=settings.beta,
            epsilon=settings.epsilon, epsilon_high=settings.clip_high, use_vllm=False)
        trainer = GRPOTrainer(model=model, reward_funcs=[echolab_reward], args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[clock.callback()])
        trainer.remove_callback(PrinterCallback)  # keep stdout to the one JSON line
        trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history if "completions/mean_length" in entry]
    return clock.times, lengths


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
    import torch

    from rl.config import RLSettings, SamplingSettings
    from rl.rollouts import Rewards
    from rl.seeds import derive_seed
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
        measured = slice(options.warmup, options.warmup + options.steps)
        # one trailing step per side is run but not measured: ours writes its final checkpoint and samples the
        # final model there
        settings = RLSettings(steps=options.warmup + options.steps, prompts_per_step=options.prompts,
                              checkpoint_every=10**6,
                              sampling=SamplingSettings(samples_per_prompt=options.samples,
                                                        max_new_tokens=options.max_new_tokens))
        problems = generate_problems(options.prompts, derive_seed(options.seed, "rl_prompts"), "train", TaskSettings())
        ours, stock, our_metrics, stock_lengths, ratios = [], [], [], [], []
        with Sandbox(workers=1) as sandbox:
            rewards = Rewards(FORMAT_SETS["synthetic"], sandbox, settings.reward_scale, 0.0)
            for _ in range(options.rounds):
                times, metrics = run_ours(model_dir, settings, problems, rewards, options.engine, options.seed)
                ours += times[measured]
                our_metrics += metrics[measured]
                stock_times, lengths = run_stock_trl(model_dir, settings, problems, rewards, options.seed,
                                                     settings.steps + 1)
                stock += stock_times[measured]
                stock_lengths += lengths[measured]
                ratios.append(statistics.median(times[measured]) / statistics.median(stock_times[measured]))

    def median(values):
        return round(statistics.median(values), 3)

    split = {f"echolab_{key}": median([m[key] for m in our_metrics]) for key in SPLIT}
    split["echolab_record_and_rest_s"] = median([t - sum(m[key] for key in SPLIT) for t, m in zip(ours, our_metrics)])
    return {
        "echolab_step_s": median(ours),
        "trl_step_s": median(stock),
        "ratio": round(statistics.median(ratios), 2),
        "ratio_per_round": [round(r, 2) for r in ratios],
        "engine": options.engine,
        **split,
        "echolab_rollout_tokens_per_s": round(statistics.median(m["rollout_tokens_per_s"] for m in our_metrics), 1),
        "echolab_mean_completion_tokens": round(statistics.mean(m["rollout_tokens"] for m in our_metrics)
                                                / (options.prompts * options.samples), 1),
        "trl_mean_completion_tokens": round(statistics.mean(stock_lengths), 1),
        "echolab_step_s_all": [round(t, 3) for t in ours],
        "trl_step_s_all": [round(t, 3) for t in stock],
        "prompts": options.prompts, "samples": options.samples, "max_new_tokens": options.max_new_tokens,
        "warmup": options.warmup, "steps": options.steps, "rounds": options.rounds,
        "torch_threads": torch.get_num_threads(), "loadavg_1min": round(os.getloadavg()[0], 2),
    }


if __name__ == "__main__":
    main()
