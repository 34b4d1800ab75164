"""pass@1 / pass@8 / pass@64 on held-out problems, for the pretrained base and each run's final checkpoint.

The RL batches hold 8 samples of 8 prompts per step, too few to see pass@k for large k. Here each model
samples `--samples` completions (temperature 1, the run's max_new_tokens) for each of `--problems`
held-out problems (the task generator's eval split, or with a prompt file as rl.prompts its held-out
split; never an RL prompt); every completion is graded as in RL (format detection, sandboxed code), and
pass@k is the unbiased estimator of Chen et al. 2021 (analysis.sampling.pass_at_k) averaged over problems.
One vLLM engine serves every model in turn (weights pushed in place). Prompts are made as the runs' rollouts
were (rl.prompt_template, rl.chat_template) and graded with the runs' format set (mixture.format_set). Prints
one JSON line per model: pass@k and the held-out format shares.

    python experiments/studies/echo_chamber/heldout_pass_at_k.py RUN_DIR [RUN_DIR ...] [--problems 64]
                                                                  [--samples 64] [--seed 0]

All runs must share one base (the pretrained one, or the checkpoint of `[model] path`) and one prompt template,
as the runs of one sweep cell do.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def evaluate_model(engine, model, prompter, problems, sampling, formats, sandbox, seed: int) -> dict:
    """Sample, grade and score one model on the held-out problems, prompted by `prompter`
    (specialists.prompting.Prompter) and graded with `formats`."""
    from analysis.sampling import pass_at_k
    from specialists.grading import grade_completions

    engine.sync_weights(model)
    groups = engine.generate([prompter.text(p) for p in problems], sampling, seed)
    texts = [c.text for group in groups for c in group]
    golds = [p.answer for p, group in zip(problems, groups, strict=True) for _ in group]
    grades = grade_completions(texts, golds, formats, sandbox)
    n = sampling.samples_per_prompt
    correct = [sum(g.correct for g in grades[i * n:(i + 1) * n]) for i in range(len(problems))]
    budgets = [k for k in (1, 8, 64) if k <= n]
    formats = Counter(g.format for g in grades)
    return {
        **{f"pass@{k}": round(sum(pass_at_k(n, c, k) for c in correct) / len(problems), 4) for k in budgets},
        "format_share": {name: round(count / len(grades), 3) for name, count in sorted(formats.items())},
    }


def shared_base(configs) -> Path:
    """The one RL base of the runs' configs (experiments.pipeline.base_model: the checkpoint of `[model] path`, or
    the pretrained built-in model); SystemExit when they have several bases or prompt them differently."""
    from experiments.pipeline import base_model

    bases = {base_model(config, progress=False) for config in configs}
    if len(bases) != 1:
        raise SystemExit(f"the runs have {len(bases)} different bases; give runs of one base")
    prompting = {(config.rl.prompt_template, config.rl.chat_template, config.mixture.format_set) for config in configs}
    if len(prompting) != 1:
        raise SystemExit("the runs differ in rl.prompt_template, rl.chat_template or mixture.format_set; give runs "
                         "that prompt and grade alike")
    return bases.pop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, and the draw of synthetic problems")
    args = parser.parse_args()

    from experiments.config import ExperimentConfig
    from rl.config import SamplingSettings
    from rl.engines import VLLMEngine
    from specialists.formats import load_formats
    from specialists.model import load_model
    from specialists.prompting import Prompter
    from specialists.sandbox import Sandbox
    from specialists.tasks import generate_problems
    from specialists.tokenizer import load_tokenizer

    configs = [ExperimentConfig.model_validate(json.loads((run / "config.json").read_text())) for run in args.run_dirs]
    base, config = shared_base(configs), configs[0]
    if config.rl.prompts == "synthetic":
        problems = generate_problems(args.problems, args.seed, "eval", config.task)
    else:  # the prompt file's held-out split (specialists.prompt_data): never an RL prompt
        problems = config.rl.prompt_split().heldout[:args.problems]
        if not problems:
            raise SystemExit(f"{config.rl.prompts} has no held-out split: the runs need rl.heldout_prompts or "
                             "rl.heldout_fraction")
    sampling = SamplingSettings(temperature=1.0, max_new_tokens=config.rl.sampling.max_new_tokens,
                                samples_per_prompt=args.samples)
    tokenizer = load_tokenizer(base)
    prompter = Prompter(tokenizer, config.rl.prompt_template, config.rl.chat_template)
    formats = load_formats(config.mixture.format_set)
    engine = VLLMEngine(base, tokenizer, config.model.max_length, args.seed)
    models = [("base", base)] + [(run.name, sorted((run / "checkpoints").glob("step_*"))[-1]) for run in args.run_dirs]
    try:
        with Sandbox() as sandbox:
            for name, weights in models:
                result = evaluate_model(engine, load_model(weights), prompter, problems, sampling, formats, sandbox,
                                        args.seed)
                print(json.dumps({"model": name, "checkpoint": weights.name, **result}), flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
