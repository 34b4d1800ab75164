"""Every seed of RL post-training derives from the run's seed here, and only here.

A seed is a pure function of (run seed, what it is for): a resumed run draws exactly what the uninterrupted
one did, two purposes never share a random stream, and no draw depends on how many draws came before
(the global RNG is left alone). The purposes:

- `step_seed(seed, step, "sampling")`: the engine's seed for the rollouts of `step`; each prompt of the
  request then gets `request_seed(that, prompt_index)` (vLLM: `SamplingParams(seed=...)`, a private
  generator per request; transformers: the seed of the batch starting at that prompt);
- `step_seed(seed, step, "minibatches" | "clip_cov" | "sft" | "replay:U")`: the other draws of one step;
- `step_seed(seed, step, "heldout")`: the engine's seed for the held-out evaluation of `step` (rl.evaluation);
- `step_seed(seed, step, "dynamic_sampling:R")`: the engine's seed of dynamic sampling's round R at `step`;
- `derive_seed(seed, "prompt_order", epoch)` and `derive_seed(seed, "rl_prompts")`: the prompt set's order
  per epoch and the draw of the synthetic RL prompts; `derive_seed(seed, "heldout_problems")` the draw of the
  synthetic held-out problems (with the experiment's top-level seed, so runs over rl.seed share them);
  `derive_seed(seed, "dynamic_sampling", step)`: the order of the further prompts dynamic sampling draws at `step`.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 31  # vLLM and torch accept any value below 2**31


def derive_seed(*parts: object) -> int:
    """A 31-bit seed that depends on `parts` alone (SHA-256 of their text, first 4 bytes)."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & (2**SEED_BITS - 1)


def step_seed(seed: int, step: int, purpose: str) -> int:
    """The seed of one use of randomness (`purpose`) at one RL step."""
    return derive_seed(seed, step, purpose)


def request_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th prompt of one engine request made with `seed`."""
    return derive_seed(seed, "request", index)
