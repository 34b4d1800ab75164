"""Wall time of one GRPO step: ours (rl.grpo through rl.training.train, rollouts from our engine) against stock
TRL GRPOTrainer (transformers generation inside the trainer), in the same process and on the same model,
prompts, samples, lengths and GRPO settings.

A step is timed from the end of one step to the end of the next, so it covers sampling, grading (the same
sandboxed `rl.rollouts.Rewards` for both), the loss forward/backward, the optimiser update and, for ours, the
weight sync and the recording of rollouts, router statistics and metrics: ours between consecutive step
observer calls (rl.recipe.StepObserver), TRL's between consecutive `on_step_end` callbacks. Each side runs
`--warmup` steps, then `--steps` measured ones, then one unmeasured step (ours writes its final checkpoint
and samples the final model there); the median of the measured ones is reported. The machine is shared and
its load moves, so the two sides alternate in `--rounds` rounds (ours, stock, ours, stock, ...): `ratio` is
the median over rounds of each round's ratio of medians (a paired comparison of runs minutes apart), the step
times are medians over all rounds.

Each step is also split into phases, timed around the calls both sides make: `rollout` (our engine's
`generate`; TRL's `model.generate`), `score` (the shared Rewards), `loss_forward` (rl.grpo.grpo_loss; TRL's
`compute_loss`), `backward` (`Tensor.backward`), `optimizer` (torch's global optimiser-step hooks: AdamW, the
gradient clip is in `rest`), `sync` (our engine's `sync_weights`; TRL has none) and `rest` (packing, advantages,
routing counts, recording; TRL's tokenisation and input preparation). Every figure is given twice: wall
seconds, and CPU seconds of this process (`time.process_time`: the in-process vLLM engine and the training,
not the sandbox workers), which a loaded machine inflates far less than the wall clock (`cpu_ratio`). The
phase medians are taken phase by phase, so they need not add up to the step median. Prints one JSON line.

    python bench/rl_step.py [--engine vllm|hf] [--model DIR] [--prompts 8] [--samples 8] [--max-new-tokens 96]
                            [--warmup 2] [--steps 5] [--rounds 1]

Without `--model`, a tiny MoE is pretrained first (`--pretrain-examples`, default 2000; not timed).
`--engine vllm` builds the engine with `rl.engines.make_engine`. Torch runs one intra-op thread on both sides
(OMP_NUM_THREADS=1 unless set), as the earlier figures were taken.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = ("rollout", "score", "loss_forward", "backward", "optimizer", "sync")


class StepClock:
    """Wall and CPU seconds (this process: the in-process vLLM engine and the training, not the sandbox workers)
    of each step, from the end of one step to the end of the next (the first from `start`), split into the
    PHASES timed by `phase` plus "rest" (packing, advantages, routing counts, recording, TRL's input
    preparation). A step observer (rl.recipe.StepObserver) and, through `callback`, a TRL callback."""

    def __init__(self):
        self.steps: list[dict] = []  # per step: {"wall": {phase: s}, "cpu": {phase: s}}
        self.start()

    def start(self, now: tuple[float, float] | None = None):
        self._last = now or (time.perf_counter(), time.process_time())
        self._phases = {"wall": dict.fromkeys(PHASES, 0.0), "cpu": dict.fromkeys(PHASES, 0.0)}

    def _tick(self):
        now = (time.perf_counter(), time.process_time())
        step = self._phases
        for kind, total in zip(("wall", "cpu"), (now[0] - self._last[0], now[1] - self._last[1])):
            step[kind]["step"] = total
            step[kind]["rest"] = total - sum(step[kind][phase] for phase in PHASES)
        self.steps.append(step)
        self.start(now)  # the next step starts where this one ended

    def phase(self, name: str, function):
        """`function`, with the seconds of each call added to phase `name` of the current step."""
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self._phases["wall"][name] += time.perf_counter() - wall
                self._phases["cpu"][name] += time.process_time() - cpu
        return timed

    @contextmanager
    def backward_and_optimizer(self):
        """Time every `Tensor.backward` and optimiser step (torch's global optimiser hooks) inside the block."""
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        backward = torch.Tensor.backward
        torch.Tensor.backward = self.phase("backward", backward)
        started = {}

        def pre(optimizer, args, kwargs):
            started["at"] = (time.perf_counter(), time.process_time())

        def post(optimizer, args, kwargs):
            wall, cpu = started.pop("at")
            self._phases["wall"]["optimizer"] += time.perf_counter() - wall
            self._phases["cpu"]["optimizer"] += time.process_time() - cpu

        handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        try:
            yield
        finally:
            torch.Tensor.backward = backward
            for handle in handles:
                handle.remove()

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


class TimedRewards:
    """`rewards` with each call's seconds in phase "score" of `clock`."""

    def __init__(self, rewards, clock: StepClock):
        self._call = clock.phase("score", rewards.__call__)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)


def run_ours(model_dir: Path, settings, problems, rewards, engine_kind: str, seed: int):
    import rl.grpo
    from rl.config import EngineSettings
    from rl.engines import make_engine
    from rl.recipe import Run
    from rl.recorder import Recorder
    from rl.rollouts import PromptSet
    from rl.training import train
    from specialists.model import load_model
    from specialists.prompting import Prompter
    from specialists.run_directory import read_metrics
    from specialists.tokenizer import load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    engine = make_engine(EngineSettings(kind=engine_kind), model_dir, model, tokenizer,
                         max_length=model.config.max_position_embeddings, seed=seed)
    clock = StepClock()
    engine.generate = clock.phase("rollout", engine.generate)
    engine.sync_weights = clock.phase("sync", engine.sync_weights)
    grpo_loss = rl.grpo.grpo_loss
    rl.grpo.grpo_loss = clock.phase("loss_forward", grpo_loss)
    try:
        with tempfile.TemporaryDirectory(prefix="rl-step-bench-") as run_dir, clock.backward_and_optimizer():
            run = Run(settings=settings, model=model, tokenizer=tokenizer, engine=engine,
                      prompt_set=PromptSet(problems, len(problems), seed, Prompter(tokenizer)),
                      rewards=TimedRewards(rewards, clock), recorder=Recorder(run_dir), seed=seed, progress=False)
            clock.start()
            train(run, observers=[clock])
            metrics = read_metrics(run_dir).lines
    finally:
        rl.grpo.grpo_loss = grpo_loss
        engine.close()
    return clock.steps, metrics


def run_stock_trl(model_dir: Path, settings, problems, rewards, seed: int, steps: int):
    import datasets
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from specialists.model import load_model
    from specialists.tasks import prompt_text
    from specialists.tokenizer import load_tokenizer

    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    samples = settings.sampling.samples_per_prompt
    clock = StepClock()
    model.generate = clock.phase("rollout", model.generate)  # TRL generates with the model it trains (no sync)
    timed_rewards = TimedRewards(rewards, clock)

    def echolab_reward(prompts, completions, answer, **kwargs):
        return timed_rewards(list(completions), list(answer), samples)[0].tolist()

    dataset = datasets.Dataset.from_dict({"prompt": [prompt_text(p) for p in problems],
                                          "answer": [float(p.answer) for p in problems]})
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
        trainer.compute_loss = clock.phase("loss_forward", trainer.compute_loss)
        with clock.backward_and_optimizer():
            trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history if "completions/mean_length" in entry]
    return clock.steps, lengths


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
        ours, stock, our_metrics, stock_lengths = [], [], [], []
        ratios = {"wall": [], "cpu": []}
        load_before = os.getloadavg()[0]
        with Sandbox(workers=1) as sandbox:
            rewards = Rewards(FORMAT_SETS["synthetic"], sandbox, settings.reward_scale, 0.0)
            for _ in range(options.rounds):
                our_steps, metrics = run_ours(model_dir, settings, problems, rewards, options.engine, options.seed)
                stock_steps, lengths = run_stock_trl(model_dir, settings, problems, rewards, options.seed,
                                                     settings.steps + 1)
                ours += our_steps[measured]
                our_metrics += metrics[measured]
                stock += stock_steps[measured]
                stock_lengths += lengths[measured]
                for kind in ratios:
                    ratios[kind].append(statistics.median(s[kind]["step"] for s in our_steps[measured])
                                        / statistics.median(s[kind]["step"] for s in stock_steps[measured]))

    def median(values):
        return round(statistics.median(values), 3)

    def split(steps, kind):
        return {phase: median([s[kind][phase] for s in steps]) for phase in (*PHASES, "rest")}

    return {
        "echolab_step_s": median([s["wall"]["step"] for s in ours]),
        "trl_step_s": median([s["wall"]["step"] for s in stock]),
        "ratio": round(statistics.median(ratios["wall"]), 2),
        "ratio_per_round": [round(r, 2) for r in ratios["wall"]],
        "echolab_step_cpu_s": median([s["cpu"]["step"] for s in ours]),
        "trl_step_cpu_s": median([s["cpu"]["step"] for s in stock]),
        "cpu_ratio": round(statistics.median(ratios["cpu"]), 2),
        "cpu_ratio_per_round": [round(r, 2) for r in ratios["cpu"]],
        "engine": options.engine,
        "echolab_split_s": split(ours, "wall"), "trl_split_s": split(stock, "wall"),
        "echolab_split_cpu_s": split(ours, "cpu"), "trl_split_cpu_s": split(stock, "cpu"),
        "echolab_rollout_tokens_per_s": round(statistics.median(m["rollout_tokens_per_s"] for m in our_metrics), 1),
        "echolab_mean_completion_tokens": round(statistics.mean(m["rollout_tokens"] for m in our_metrics)
                                                / (options.prompts * options.samples), 1),
        "trl_mean_completion_tokens": round(statistics.mean(stock_lengths), 1),
        "echolab_step_s_all": [round(s["wall"]["step"], 3) for s in ours],
        "trl_step_s_all": [round(s["wall"]["step"], 3) for s in stock],
        "prompts": options.prompts, "samples": options.samples, "max_new_tokens": options.max_new_tokens,
        "warmup": options.warmup, "steps": options.steps, "rounds": options.rounds,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


if __name__ == "__main__":
    main()
