"""Pretraining the specialists: together (one causal LM on the whole mixture) or apart and merged (BTX).

The corpus is `prompt + solution + <|endoftext|>` for synthetic problems, each rendered in one format drawn
from the mixture, or, for a format with a `data` file, that file's own texts (+ <|endoftext|>).

Recipes, by `model.kind`:
- `moe`, `dense`: one model trained on the whole shuffled corpus (the joint specialists, or the baseline).
- `btx`: Branch-Train-MiX (Sukhbaatar et al. 2024, arXiv:2403.07816, section 2): a dense seed model trained
  on the first `btx.seed_fraction` of the corpus (the whole mixture); one copy of it per format (branch),
  each trained on all of that format's examples, i.e. the joint model's data split by format (train); their
  MLPs merged into a Qwen3-MoE of the joint model's shape (`specialists.btx`), whose routers, or all of
  whose weights (`btx.mix_train`), then train on the last `btx.mix_fraction` of the corpus (mix).

Every phase runs the same loop (`train_causal_lm`): next-token cross-entropy on the whole text plus, for an
MoE, the router load-balancing loss (Switch Transformer, arXiv:2101.03961, eq. 4-6) weighted by
`router_aux_loss_coef`, AdamW with a cosine schedule that decays fully within the phase's budget (a
schedule cut off early learned the prose formats far worse in trials here), one pass over the phase's data.

Output directory layout:
    model/                HF checkpoint (config, safetensors, tokenizer), loadable by transformers and vLLM
    specialists/FORMAT/   (btx) each dense specialist before the merge, an HF checkpoint with the tokenizer
    pretrain_log.jsonl    loss per logging step, with its phase (joint; seed, specialist:FORMAT, mix)
    pretrain_summary.json parameters, and examples, steps and tokens per phase
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

from specialists import btx
from specialists.config import PretrainSettings, SpecialistsConfig
from specialists.corpus import read_texts
from specialists.errors import UserError
from specialists.formats import FORMAT_SETS
from specialists.model import build_model, count_parameters, is_moe, model_config
from specialists.tasks import generate_problems, prompt_text
from specialists.tokenizer import END_OF_TEXT, train_tokenizer

LOG_EVERY = 10


@dataclass(frozen=True)
class Example:
    """One training text. A data file's text is a whole document: its prompt is empty."""

    format: str
    prompt: str
    solution: str

    @property
    def text(self) -> str:
        return self.prompt + self.solution + END_OF_TEXT


def build_corpus(config: SpecialistsConfig) -> list[Example]:
    """Examples in the mixture's proportions, shuffled with the config's seed.

    Each format gets its own distinct training problems (like separate pretraining datasets), or its own
    texts drawn without replacement from its data file (a seeded sample: files are often sorted);
    with `repeat = k` a format has 1/k as many distinct problems or texts, each seen k times.
    """
    renderers = {f.name: f for f in FORMAT_SETS["synthetic"]}
    sizes = config.corpus_sizes()
    formats = config.mixture.formats
    rendered = [name for name in sizes if formats[name].data is None]
    problems = generate_problems(sum(sizes[name][1] for name in rendered), config.seed, "train", config.task)
    examples, start = [], 0
    for name, (count, distinct) in sizes.items():
        share = formats[name]
        if share.data is None:
            own = problems[start:start + distinct]
            start += distinct
            texts = [Example(name, prompt_text(p), renderers[name].render(p, share.difficulty)) for p in own]
        else:
            lines = read_texts(share.data)  # has enough texts: checked when the config was loaded
            chosen = random.Random(f"{config.seed}/{name}").sample(range(len(lines)), distinct)
            texts = [Example(name, "", lines[index]) for index in chosen]
        examples += (texts * share.repeat)[:count]
    random.Random(config.seed).shuffle(examples)
    return examples


def _batches(token_ids: list[list[int]], batch_size: int, pad_id: int, seed: int):
    """Yield (input_ids, attention_mask, labels) batches in a seeded random order, padded on the right."""
    order = list(range(len(token_ids)))
    random.Random(seed + 1).shuffle(order)
    for begin in range(0, len(order), batch_size):
        rows = [token_ids[i] for i in order[begin:begin + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        yield input_ids, attention_mask, labels


def train_causal_lm(model: PreTrainedModel, token_ids: list[list[int]], settings: PretrainSettings, pad_id: int,
                    seed: int, phase: str, log: IO[str], progress: bool = True,
                    trainable: list[torch.nn.Parameter] | None = None) -> dict:
    """One pass over `token_ids` in seeded random batches (`seed`), training `trainable` (default: every
    parameter) in place; one JSON line per LOG_EVERY steps to `log`. Returns the phase's examples, steps, tokens."""
    trainable = list(model.parameters()) if trainable is None else trainable
    chosen = {id(parameter) for parameter in trainable}
    frozen = [parameter for parameter in model.parameters() if id(parameter) not in chosen]
    for parameter in frozen:  # no gradients computed for what this phase does not train
        parameter.requires_grad_(False)
    model.train()
    steps = math.ceil(len(token_ids) / settings.batch_size)
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_fraction * steps), steps)
    moe = is_moe(model)
    started, tokens_seen = time.perf_counter(), 0
    with tqdm(total=steps, desc=f"pretrain {phase}", disable=not progress) as bar:
        for step, (input_ids, attention_mask, labels) in enumerate(
                _batches(token_ids, settings.batch_size, pad_id, seed), start=1):
            extra = {"output_router_logits": True} if moe else {}
            output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)
            _require_finite("loss", output.loss, phase, step)
            output.loss.backward()
            _require_finite("gradient norm", torch.nn.utils.clip_grad_norm_(trainable, 1.0), phase, step)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += int(attention_mask.sum())
            bar.update(1)
            if step % LOG_EVERY == 0 or step == steps:
                elapsed = time.perf_counter() - started
                record = {"phase": phase, "step": step, "loss": round(output.loss.item(), 5),
                          "lr": schedule.get_last_lr()[0], "tokens_per_s": round(tokens_seen / elapsed, 1),
                          "elapsed_s": round(elapsed, 2)}
                if moe:
                    record["aux_loss"] = round(output.aux_loss.item(), 5)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=record["loss"])
    for parameter in frozen:
        parameter.requires_grad_(True)
    model.eval()
    return {"examples": len(token_ids), "steps": steps, "tokens": tokens_seen}


def _require_finite(name: str, value: torch.Tensor, phase: str, step: int) -> None:
    """Stop pretraining with a UserError naming the phase and step when the loss or gradient norm turns NaN or
    infinite: checked before backward and before the optimiser step, so no NaN reaches the weights (and no NaN
    model is saved for the evaluation to trip over)."""
    if not torch.isfinite(value.detach()).all():
        raise UserError(f"pretraining phase {phase!r}, step {step}: the {name} is {value.item()}; no model was "
                        "saved (lower pretrain.learning_rate, or raise warmup_fraction)")


def pretrain(config: SpecialistsConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Train tokenizer and model from scratch (the recipe of `model.kind`); return the HF checkpoint's directory."""
    out_dir = Path(out_dir)
    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    examples = build_corpus(config)
    tokenizer: PreTrainedTokenizerFast = train_tokenizer((e.text for e in examples), config.pretrain.vocab_size)
    token_ids = [tokenizer(e.text, add_special_tokens=False)["input_ids"] for e in examples]
    too_long = sum(len(ids) > config.model.max_length for ids in token_ids)
    if too_long:
        raise UserError(f"{too_long} training examples exceed model.max_length={config.model.max_length} tokens")

    started = time.perf_counter()
    with (out_dir / "pretrain_log.jsonl").open("w") as log:
        if config.model.kind == "btx":
            model, phases = branch_train_mix(config, examples, token_ids, tokenizer, out_dir, log, progress)
        else:
            model = build_model(config.model, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, config.seed)
            phases = {"joint": train_causal_lm(model, token_ids, config.pretrain, tokenizer.pad_token_id, config.seed,
                                               "joint", log, progress)}
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    summary = {"parameters": count_parameters(model),
               **{key: sum(phase[key] for phase in phases.values()) for key in ("examples", "steps", "tokens")},
               "seconds": round(time.perf_counter() - started, 2), "phases": phases}
    (out_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return model_dir


def branch_train_mix(config: SpecialistsConfig, examples: list[Example], token_ids: list[list[int]],
                     tokenizer: PreTrainedTokenizerFast, out_dir: Path, log: IO[str],
                     progress: bool = True) -> tuple[PreTrainedModel, dict]:
    """BTX (module docstring): seed -> one specialist per format -> merge -> mix. Phase k's batch order is
    seeded with seed * 1_000_003 + k (k = 0 seed phase, 1..F the specialists in alphabetical order of their
    formats, F + 1 mix).
    Saves each specialist under out_dir/specialists/FORMAT. Returns the merged model and the phases' sizes."""
    settings, formats = config.btx, sorted(config.mixture.formats)  # the order of `expert_specialists`
    pad_id = tokenizer.pad_token_id
    moe_config = model_config(config.model, len(tokenizer), tokenizer.eos_token_id, pad_id)

    def phase_seed(k: int) -> int:
        return config.seed * 1_000_003 + k

    torch.manual_seed(config.seed)
    seed_model = AutoModelForCausalLM.from_config(btx.specialist_config(moe_config, len(formats)), dtype=torch.float32)
    seed_count = math.ceil(settings.seed_fraction * len(token_ids))
    phases = {"seed": train_causal_lm(seed_model, token_ids[:seed_count], config.pretrain, pad_id, phase_seed(0),
                                      "seed", log, progress)}
    specialists = []
    for k, name in enumerate(formats, start=1):
        specialist = copy.deepcopy(seed_model)  # branch: the seed's weights, a fresh optimiser
        own = [ids for ids, example in zip(token_ids, examples) if example.format == name]
        phases[f"specialist:{name}"] = train_causal_lm(specialist, own, config.pretrain, pad_id, phase_seed(k),
                                                       f"specialist:{name}", log, progress)
        specialist.save_pretrained(out_dir / "specialists" / name)
        tokenizer.save_pretrained(out_dir / "specialists" / name)
        specialists.append(specialist)

    torch.manual_seed(config.seed)  # the routers' initialisation
    model = btx.merge_specialists(specialists, moe_config, formats)
    trainable = btx.router_parameters(model) if settings.mix_train == "router" else None
    mix_count = math.ceil(settings.mix_fraction * len(token_ids))
    phases["mix"] = train_causal_lm(model, token_ids[-mix_count:], config.pretrain, pad_id, phase_seed(len(formats) + 1),
                                    "mix", log, progress, trainable)
    return model, phases
