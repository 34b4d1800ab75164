"""`CollapseCallback`: echolab's collapse measurements inside a user's own, unmodified TRL `GRPOTrainer`.

The user adds two public things to the trainer, the callback and the reward function it carries:

    collapse = CollapseCallback("runs/my-grpo", formats="echo-chamber", stop_at_collapse=True)
    trainer = GRPOTrainer(model=..., args=..., train_dataset=dataset,
                          reward_funcs=[my_reward, collapse.reward_func], callbacks=[collapse])

How the data reaches it, through TRL's public interfaces only:
- `collapse.reward_func` is a reward function. TRL calls it after each generation with the prompts, the
  completions, their token ids, the dataset's other columns (the gold answer, a prompt id), the trainer's
  state (`global_step`: the number of updates so far, i.e. echolab's step) and `log_metric` (TRL's hook for
  reward functions to log scalars through the trainer's own logger, hence every `report_to` backend). It
  returns 0.0 for every completion, so the user's rewards, and their advantages, are unchanged; in TRL's
  logs it appears as `rewards/echolab/mean = 0`. If `args.reward_weights` is set, give it a weight too.
- It grades each completion with echolab's grader (format, final answer, correctness against the
  `answer_column`, a number or text such as LaTeX; code formats through the sandbox), and, with
  `score_completions`, runs one no-grad forward of prompt + completion through the policy (the model the
  trainer hands to callbacks): the completion's log-probability (before temperature) and, for the MoE
  families `rl.routing` reads (Qwen3-MoE, OLMoE, Mixtral), the routed-token counts per layer and expert
  (`capture_routing`). That forward costs about a third of a training step's forward and backward;
  `score_completions=False` skips it (logprob and expert_load null).
- The step's metrics (`analysis.live`: format shares and accuracy, diversity, accuracy, pass@k, expert
  shares, entropy and MaxVio per layer, the collapse step and forecast) go to `log_metric`; TRL logs them
  with the update they led to, at global_step = step + 1, like its own `rewards/*`.
- The callback writes the run directory (`rl.recorder.Recorder`, specialists/run_directory.py): every
  step's rollouts at `on_step_end`, one metrics.jsonl line per training log (TRL's logged metrics, under
  the step whose rollouts the update used), and config.json (the format set, the threshold, TRL's args),
  so `echolab analyze` and `echolab report` read it like an echolab run. The `reward` column stays null:
  a reward function does not see the other reward functions' values.
- `stop_at_collapse=True` sets `control.should_training_stop` at the end of the update made with the first
  step whose largest format share reached the threshold. A collapse forecast within `warn_within` steps
  is logged as a warning (once).

Evaluation batches (the model in eval mode, which is how TRL itself tells them apart) are not recorded.
Resuming with `trainer.train(resume_from_checkpoint=...)` drops what was recorded at the checkpoint's step
and later, and carries the collapse state on. One training process only: with several, each would see
part of a step (refused when training begins).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from analysis.classify import format_names
from analysis.live import CollapseWatch
from analysis.load import rollout_frame
from analysis.sources import prompt_id, read_rollouts
from rl.recorder import Recorder, Rollout
from rl.routing import capture_routing
from rl.sequences import pack, token_logprobs
from specialists.errors import UserError
from specialists.formats import load_formats
from specialists.grading import answer_text, grade_completions
from specialists.model import is_moe
from specialists.run_directory import is_run_dir
from specialists.sandbox import Sandbox

logger = logging.get_logger(__name__)

REWARD_NAME = "echolab"  # TRL names a reward function by its __name__: rewards/echolab/mean


class CollapseCallback(TrainerCallback):
    """Record a TRL GRPO run in echolab's run directory and watch it for format collapse (module doc).

    run_dir: where the run directory goes (created; refused when it already holds rollouts, unless the
        training resumes from a checkpoint). formats: a built-in format set or a TOML/YAML format file
        (`specialists.formats.load_formats`). answer_column / prompt_id_column: the dataset columns with the
        gold answer (a number, or text such as "1,234") and a prompt identifier (default: a hash of the
        prompt). collapse_threshold: the largest format share that counts as collapse. stop_at_collapse:
        stop training once collapsed. warn_within: warn when the forecast puts the collapse within this many
        steps. score_completions: run the forward that gives logprob and expert_load.
    """

    def __init__(self, run_dir: str | Path, formats: str = "synthetic", *, answer_column: str = "answer",
                 prompt_id_column: str = "prompt_id", collapse_threshold: float = 0.9, stop_at_collapse: bool = False,
                 warn_within: int = 10, score_completions: bool = True):
        if not 0 < collapse_threshold <= 1:
            raise UserError(f"collapse_threshold must be in (0, 1], got {collapse_threshold}")
        self.run_dir, self.formats_name = Path(run_dir), str(formats)
        self.formats = load_formats(formats)
        self.names = format_names(self.formats, pd.Series([], dtype=object))
        self.answer_column, self.prompt_id_column = answer_column, prompt_id_column
        self.collapse_threshold, self.stop_at_collapse = collapse_threshold, stop_at_collapse
        self.warn_within, self.score_completions = warn_within, score_completions
        self.reward_func = _RolloutObserver(self)
        self.recorder: Recorder | None = None
        self.watch: CollapseWatch | None = None
        self.model = self.tokenizer = self.args = None
        self._sandbox: Sandbox | None = None
        self._pending: list[Rollout] = []
        self._warned = False

    # ----- training lifecycle ------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if args.world_size > 1:
            raise UserError(f"CollapseCallback records single-process training; this run has {args.world_size} "
                            "processes, each of which would see only part of a step")
        if is_run_dir(self.run_dir) and state.global_step == 0:
            raise UserError(f"{self.run_dir} already holds a run's rollouts: choose another run directory "
                            "(or resume the training from a checkpoint)")
        self.model, self.tokenizer, self.args = model, processing_class, args
        self.recorder = Recorder(self.run_dir)
        self.recorder.forget_from(state.global_step)
        self.recorder.write_config(self._config(args))
        self.watch = CollapseWatch(self.names, last_step=state.max_steps - 1, threshold=self.collapse_threshold,
                                   warn_within=self.warn_within, seed=args.seed)
        if state.global_step > 0 and is_run_dir(self.run_dir):
            self.watch.restore(read_rollouts(self.run_dir))
        self._sandbox = Sandbox()  # started here, not in __init__: a callback may be built long before training

    def on_step_end(self, args, state, control, **kwargs):
        """After the update made with the latest rollouts: write them; stop when collapsed (and asked to)."""
        if self._pending:
            self.recorder.write_rollouts(self._pending[0].step, self._pending)
            self._pending = []
        if self.stop_at_collapse and self.watch.collapse_step is not None:
            logger.warning(f"echolab: collapsed at step {self.watch.collapse_step} (a format reached "
                           f"{self.collapse_threshold:.0%} of the completions); stopping the training")
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """One metrics.jsonl line per training log, under the step whose rollouts the update used."""
        logs = logs or {}
        if "loss" in logs and "train_runtime" not in logs and self.recorder is not None:
            line = {key: (value if math.isfinite(value) else None) if isinstance(value, float) else value
                    for key, value in logs.items() if isinstance(value, (int, float)) or value is None}
            self.recorder.write_metrics(state.global_step - 1, line)

    def on_train_end(self, args, state, control, **kwargs):
        if self._sandbox is not None:
            self._sandbox.close()
            self._sandbox = None

    def _config(self, args) -> dict:
        """config.json: what `echolab analyze` reads (formats, threshold) and the trainer's arguments."""
        return {"formats": self.formats_name, "collapse_threshold": self.collapse_threshold,
                "trainer": "trl.GRPOTrainer + echolab CollapseCallback",
                "model": getattr(getattr(self.model, "config", None), "name_or_path", None),
                "trl": json.loads(args.to_json_string())}

    # ----- one generation ----------------------------------------------------------------------

    def observe(self, prompts: list, completions: list, completion_ids: list[list[int]], trainer_state,
                log_metric, columns: dict) -> None:
        """Grade, score and keep one generation's completions; log the step's metrics."""
        step = trainer_state.global_step
        texts = [_text(completion) for completion in completions]
        gold = [_gold(value) for value in columns.get(self.answer_column, [None] * len(texts))]
        given_ids = columns.get(self.prompt_id_column)
        prompt_ids = [str(value) for value in given_ids] if given_ids is not None else [prompt_id(_text(p)) for p in prompts]
        grades = grade_completions(texts, gold, self.formats, self._sandbox)
        logprobs, expert_load = self._score(prompts, completion_ids) if self.score_completions else (None, None)
        seen = Counter(row.prompt_id for row in self._pending)
        rows = []
        for index, (prompt, text, ids, key, answer, grade) in enumerate(
                zip(prompts, texts, completion_ids, prompt_ids, gold, grades, strict=True)):
            rows.append(Rollout(step=step, epoch=float(trainer_state.epoch or 0.0), prompt_id=key,
                                sample_index=seen[key], prompt=_text(prompt), completion=text,
                                answer=answer_text(answer),
                                reward=None, correct=grade.correct, format=grade.format, reason=grade.reason,
                                num_tokens=len(ids), logprob=None if logprobs is None else logprobs[index],
                                expert_load=None if expert_load is None else expert_load[index].tolist()))
            seen[key] += 1
        self._pending += rows
        for name, value in self.watch.observe(rollout_frame([asdict(row) for row in rows])).items():
            log_metric(name, value)
        if self.watch.imminent and not self._warned:
            forecast = self.watch.forecast
            interval = f"{forecast.low}-{forecast.high if forecast.high is not None else 'later'}"
            logger.warning(f"echolab: collapse onto {forecast.winner} forecast at step {forecast.collapse_step} "
                           f"(95% interval {interval}, winner in {forecast.winner_probability:.0%} of bootstrap fits); "
                           f"this is step {step}")
            self._warned = True

    def _score(self, prompts: list, completion_ids: list[list[int]]) -> tuple[list[float], torch.Tensor | None]:
        """Summed completion log-probabilities (before temperature) and, for MoE models, routed-token counts
        (completions, layers, experts), from one no-grad forward in chunks of the per-device batch size."""
        prompt_ids = self._prompt_token_ids(prompts)
        input_ids, attention_mask, completion_mask = pack(prompt_ids, [list(ids) for ids in completion_ids],
                                                          self.tokenizer.pad_token_id)
        device = next(self.model.parameters()).device
        sums = []
        chunk = max(self.args.per_device_train_batch_size, 1)
        rows_index = torch.arange(input_ids.size(0))[:, None].expand_as(completion_mask)
        owner = torch.where(completion_mask.bool(), rows_index, -1)  # (rows, length): whose completion token is counted
        with torch.no_grad(), capture_routing(self.model, owner, input_ids.size(0)) as routed:
            for rows in torch.arange(input_ids.size(0)).split(chunk):
                ids = input_ids[rows].to(device)
                logits = self.model(input_ids=ids, attention_mask=attention_mask[rows].to(device)).logits
                per_token = token_logprobs(logits, ids).cpu()  # (rows, length - 1): entry t-1 scores token t
                sums.append((per_token * completion_mask[rows, 1:]).sum(dim=1))
        expert_load = routed[0] if routed and is_moe(self.model) else None
        return torch.cat(sums).tolist(), expert_load

    def _prompt_token_ids(self, prompts: list) -> list[list[int]]:
        """The prompts tokenised as TRL's GRPOTrainer does (`_tokenize_prompts`): plain text with the processing
        class's defaults; conversations through its chat template with a generation prompt and the config's
        `chat_template_kwargs` (a trainer built with `tools` or its own `chat_template` is not reproduced)."""
        if isinstance(prompts[0], str):
            return list(self.tokenizer(text=prompts)["input_ids"])
        tokenized = self.tokenizer.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=True,
                                                       return_dict=True, **(self.args.chat_template_kwargs or {}))
        return list(tokenized["input_ids"])


class _RolloutObserver:
    """The reward function a `CollapseCallback` carries: hands each training generation to it, scores 0."""

    __name__ = REWARD_NAME

    def __init__(self, callback: CollapseCallback):
        self.callback = callback

    def __call__(self, prompts, completions, completion_ids, trainer_state=None, log_metric=None, **columns):
        callback = self.callback
        if callback.watch is None:
            raise UserError("CollapseCallback.reward_func needs the callback too: pass callbacks=[collapse]")
        if callback.model.training:  # TRL's own test for a training (not an evaluation) batch
            callback.observe(prompts, completions, completion_ids, trainer_state, log_metric or (lambda *_: None), columns)
        return [0.0] * len(completions)


def _text(value) -> str:
    """A plain-text prompt or completion as it is; a conversation (list of messages) as its messages' text."""
    if isinstance(value, str):
        return value
    return "".join(message["content"] for message in value if isinstance(message.get("content"), str))


def _gold(value) -> float | str | None:
    """A gold answer as the grader takes it: a number, or text ("1,234", "\\frac{1}{2}", "... #### 72")."""
    if isinstance(value, bool) or value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return float(value) if isinstance(value, (int, float)) else str(value)
