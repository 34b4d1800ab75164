"""Joint pretraining of the specialists: one causal LM on a mixture of solution formats.

The corpus is `prompt + solution + <|endoftext|>` for synthetic problems, each rendered in one
format drawn from the mixture. Loss is next-token cross-entropy on the whole text plus, for the
MoE, the router load-balancing loss (Switch Transformer, arXiv:2101.03961, eq. 4-6) weighted by
`router_aux_loss_coef`. The learning rate follows a cosine schedule that decays fully within the
budget (a schedule cut off early learned the prose formats far worse in trials here).

Output directory layout:
    model/               HF checkpoint (config, safetensors, tokenizer), loadable by transformers and vLLM
    pretrain_log.jsonl   loss per logging step
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

from specialists.config import SpecialistsConfig
from specialists.errors import UserError
from specialists.formats import FORMAT_SETS
from specialists.model import build_model, count_parameters, is_moe
from specialists.tasks import generate_problems, prompt_text
from specialists.tokenizer import END_OF_TEXT, train_tokenizer

LOG_EVERY = 10


@dataclass(frozen=True)
class Example:
    format: str
    prompt: str
    solution: str

    @property
    def text(self) -> str:
        return self.prompt + self.solution + END_OF_TEXT


def build_corpus(config: SpecialistsConfig) -> list[Example]:
    """Examples in the mixture's proportions, shuffled with the config's seed.

    Each format gets its own distinct training problems (like separate pretraining datasets);
    with `repeat = k` a format has 1/k as many distinct problems, each seen k times.
    """
    renderers = {f.name: f for f in FORMAT_SETS["synthetic"]}
    sizes = config.corpus_sizes()
    problems = generate_problems(sum(distinct for _, distinct in sizes.values()), config.seed, "train", config.task)
    examples, start = [], 0
    for name, (count, distinct) in sizes.items():
        share = config.mixture.formats[name]
        own = problems[start:start + distinct]
        start += distinct
        rendered = [Example(name, prompt_text(p), renderers[name].render(p, share.difficulty)) for p in own]
        examples += (rendered * share.repeat)[:count]
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


def pretrain(config: SpecialistsConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Train tokenizer and model from scratch; return the directory of the HF checkpoint."""
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

    model = build_model(config.model, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, config.seed)
    model.train()
    settings = config.pretrain
    steps = math.ceil(len(examples) / settings.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                  betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_fraction * steps), steps)
    moe = is_moe(model)

    log_path = out_dir / "pretrain_log.jsonl"
    started, tokens_seen = time.perf_counter(), 0
    with log_path.open("w") as log, tqdm(total=steps, desc="pretrain", disable=not progress) as bar:
        for step, (input_ids, attention_mask, labels) in enumerate(
                _batches(token_ids, settings.batch_size, tokenizer.pad_token_id, config.seed), start=1):
            extra = {"output_router_logits": True} if moe else {}
            output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **extra)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += int(attention_mask.sum())
            bar.update(1)
            if step % LOG_EVERY == 0 or step == steps:
                elapsed = time.perf_counter() - started
                record = {"step": step, "loss": round(output.loss.item(), 5), "lr": schedule.get_last_lr()[0],
                          "tokens_per_s": round(tokens_seen / elapsed, 1), "elapsed_s": round(elapsed, 2)}
                if moe:
                    record["aux_loss"] = round(output.aux_loss.item(), 5)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=record["loss"])

    model.eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    summary = {"parameters": count_parameters(model), "examples": len(examples), "steps": steps,
               "tokens": tokens_seen, "seconds": round(time.perf_counter() - started, 2)}
    (out_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return model_dir
