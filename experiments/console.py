"""What a person sees on the console while a command runs, in one place.

- `silence_libraries()`: third-party INFO logs, progress bars and known-harmless warnings, silenced at their
  source (each with the reason); the CLI calls it first, before any heavy library is imported.
- `step_zero_problem(rows)`: when the base model's step-0 samples give RL nothing to learn from (no recognised
  format, or equal rewards within every prompt's group), the words a user acts on; `StepZeroCheck` prints them
  as soon as step 0 is recorded, and `final_lines` repeats them.
- `StepLine`: the per-step line printed above the progress bar (not with --quiet).
- `final_lines(run_dir)`: the summary `echolab run` ends with, from the run directory (summary.json and the
  recorded step-0 rollouts), never naming `other` (text that fits no format) as a collapse winner.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path

from specialists.formats import OTHER
from specialists.run_directory import SUMMARY_FILE, rollout_file


def silence_libraries() -> None:
    """Silence what other libraries print that a user cannot act on. Errors still show, and an environment
    variable the user set (e.g. VLLM_LOGGING_LEVEL=INFO to debug the engine) wins over these defaults."""
    # vLLM logs INFO lines (engine arguments, KV cache size, "Successfully reset prefix cache" at every weight
    # sync) and warnings that are choices of ours or facts of this CPU: the global seed it sets (we seed every
    # request ourselves), chunked prefill off (needed for seeded requests on CPU), eager mode, no Triton CPU
    # backend, libtcmalloc/libiomp not preloaded, torch.set_num_threads after thread binding. Read on import.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # vLLM configures its loggers only when an engine starts; what it logs on import before that ("Triton is
    # installed, but doesn't include CPU backend") would reach Python's last-resort handler.
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"].upper())
    # torch's C++ warnings, e.g. "NUMA binding: Using MEMBIND policy" when vLLM binds its CPU threads. Read on import.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # vLLM's triton_utils touches the deprecated torch.distributed.reduce_op while scanning torch for kernels.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.*", category=FutureWarning)
    # transformers' "Loading weights" / "Writing model shards" bars (transformers follows huggingface_hub's
    # switch): our checkpoints load and save in milliseconds. (vLLM's own loading bar is switched off where the
    # engine is built, rl.weight_sync.make_llm.) Read on import.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _rows(rows: Iterable) -> list[Mapping]:
    return [asdict(row) if is_dataclass(row) else row for row in rows]


def step_zero_problem(rows: Iterable) -> str | None:
    """Why RL can learn nothing from the base model's step-0 samples, in words a user acts on; None when it can.

    `rows`: the recorded rollouts of step 0 (mappings or `rl.recorder.Rollout`s with prompt_id, format, reward).
    Two cases: no completion fits a format (every one is `other`), so there is no format mix to change and
    nothing is graded; or every prompt's samples got equal rewards, so every group-relative advantage
    A_i = r_i - mean(r) is 0 (GRPO's whole signal, and the value of a state PPO's critic cannot tell apart).
    """
    rows = _rows(rows)
    if not rows:
        return None
    if all(row["format"] == OTHER for row in rows):
        return (f"the base model produces no recognised format: all {len(rows)} step-0 completions fit no format, "
                "so RL has no signal (pretrain longer: raise pretrain.num_examples)")
    groups: dict[str, set] = {}
    for row in rows:
        groups.setdefault(str(row["prompt_id"]), set()).add(row["reward"])
    if all(len(rewards) == 1 for rewards in groups.values()):
        values = sorted(set().union(*groups.values()))
        which = f"every reward is {values[0]:g}" if len(values) == 1 else "rewards differ only between prompts"
        return (f"at step 0 every prompt's samples got the same reward ({which}), so every group-relative advantage "
                "is 0 and RL has no signal (pretrain longer, or use easier prompts: [task])")
    return None


class StepZeroCheck:
    """A step observer (rl.training.train's `observers`): prints `step_zero_problem` as soon as step 0 is recorded."""

    def on_step(self, step: int, rollouts: list, metrics: dict) -> None:
        if step == 0 and (problem := step_zero_problem(rollouts)):
            print_above_bars(f"warning: {problem}")


class StepLine:
    """A step observer printing one line per recorded step: reward, accuracy and format mix of its samples."""

    def __init__(self, steps: int):
        self.steps = steps  # the last step's number (rl.steps: the final model's step)

    def on_step(self, step: int, rollouts: list, metrics: dict) -> None:
        print_above_bars(step_line(step, self.steps, _rows(rollouts), metrics))


def step_line(step: int, last: int, rows: list[Mapping], metrics: dict) -> str:
    """"step 3/16: reward 0.42, accuracy 0.38, formats python_function 50% llm_code 25% ... (12.3 s)"."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["format"]] = counts.get(row["format"], 0) + 1
    mix = " ".join(f"{name} {count / len(rows):.0%}" for name, count in sorted(counts.items(), key=lambda kv: -kv[1]))
    parts = [f"{key.removesuffix('_mean')} {metrics[key]:.3f}" for key in ("reward_mean", "accuracy")
             if isinstance(metrics.get(key), (int, float))]
    took = f" ({metrics['step_time_s']:.1f} s)" if isinstance(metrics.get("step_time_s"), (int, float)) else ""
    return f"step {step}/{last}: {', '.join(parts + [f'formats {mix}'])}{took}"


def print_above_bars(line: str) -> None:
    """One line on stderr that does not break a progress bar being drawn there."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def final_lines(run_dir: Path) -> list[str]:
    """What `echolab run` prints last: the format mix at the last step, the collapse (onto a format, never onto
    `other`) or why there is none, and the step-0 problem if there was one."""
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    shares = {int(step): share for step, share in summary["format_share"].items()}
    last = max(shares)
    mix = ", ".join(f"{name} {share:.0%}" for name, share in sorted(shares[last].items(), key=lambda kv: -kv[1]))
    lines = [f"formats at step {last}: {mix}"]
    step, threshold = summary["collapse_step"], summary.get("collapse_threshold", 0.9)
    winner = summary["dominant_format"]
    if step is not None and winner != OTHER and max(shares[step], key=shares[step].get) == winner:
        epoch = f" (epoch {summary['collapse_epoch']:g})" if summary.get("collapse_epoch") is not None else ""
        lines.append(f"collapse: onto {winner} at step {step}{epoch}, its share >= {threshold:g}")
    elif shares[last].get(OTHER, 0.0) >= threshold:
        lines.append(f"no collapse onto a format: {shares[last][OTHER]:.0%} of the last step's completions fit "
                     "no format")
    else:
        lead = max((name for name in shares[last] if name != OTHER), key=shares[last].get)
        lines.append(f"no collapse: no format reached a share of {threshold:g} (at the last step {lead} leads with "
                     f"{shares[last][lead]:.0%})")
    step_zero = rollout_file(run_dir, 0)
    if step_zero.is_file():
        import pyarrow.parquet as pq

        problem = step_zero_problem(pq.read_table(step_zero, columns=["prompt_id", "format", "reward"]).to_pylist())
        if problem:
            lines.append(f"warning: {problem}")
    return lines
