"""Data parallelism: one RL run across processes (`echolab run CONFIG --processes N`).

N processes ("ranks") each hold the whole model, their own rollout engine and a contiguous share of every step's
prompts: rank r gets prompts [r P/N, (r + 1) P/N) of the step's P, sampled with their *global* prompt indices
(rl.seeds.request_seed(seed, index)), so the N ranks together draw exactly the completions one process draws.

The maths equals the one-process run's because every quantity that mixes rollouts is made global:

- A loss term that averages over the batch (tokens, or sequences for GRPO's "grpo" and "dr_grpo" reductions) is
  computed on the rank's rows and weighted by the rank's share of what it averages over (local count / global
  count, `Shard.weights`): the ranks' terms then add up to the global term, and the gradients are *summed* across
  ranks (`Shard.sum_gradients`, one all-reduce per optimiser step) before clipping, so every rank takes the same
  optimiser step the one-process run takes. The router load-balancing loss is not such a mean (a product of two
  batch means): `load_balancing_loss` all-reduces its routed-token counts first (rl.losses.load_balancing_share).
- Statistics (clip fraction, entropy, KL, ...) are shares too and are summed (`Shard.sum_values`); maxima are
  all-reduced with max; PPO's advantage whitening uses the global token mean and std (`Shard.masked_mean`).
- GRPO's advantages are per prompt group, and a group never spans ranks. PPO's minibatches are drawn from one seeded
  permutation of the global batch; each rank trains on its own rows of each minibatch (possibly none: it then
  adds zero to every sum and still joins every collective).
- Rank 0 gathers each step's rollouts (`Shard.gather`, through the rendezvous store) and alone records the run
  directory, checkpoints and observers.

Float sums then run in another order than in one process, so metrics and weights agree to float rounding, not
bit for bit. With one process (`Shard()`, the default) every function here is the identity or the one-process
formula itself, so single-process runs compute exactly what they computed before data parallelism existed.

The collectives go through a process group of our own (`ProcessGroupGloo` on CPU, `ProcessGroupNCCL` on GPUs)
built on a `TCPStore`, not through torch.distributed's default group: the in-process vLLM engine of each rank
initialises that default group for itself (a world of one).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from datetime import timedelta

import torch

from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # every MoE family's (TRL uses it too)

from rl.losses import explained_variance, kl_k3, load_balancing_share, masked_mean, sampler_mismatch

# How long a rank waits for the others at a collective or the store (a stuck rank ends the run, not hangs it).
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Weights:
    """This rank's share of one batch's completion tokens and sequences (local count / count over every rank): what
    its loss terms and statistics are multiplied by, so that they add up over the ranks to the batch's. 1.0 each
    with one process."""

    tokens: float = 1.0
    sequences: float = 1.0


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel run: rank `rank` of `world_size`, with the process group and the
    store the ranks meet at (None for one process)."""

    rank: int = 0
    world_size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup
    store: object | None = None  # torch.distributed TCPStore

    @classmethod
    def from_environment(cls, backend: str = "gloo") -> "Shard":
        """Join the run described by torch.distributed.run's variables: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE."""
        import torch.distributed as dist

        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=rank == 0, timeout=TIMEOUT)
        group = (dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT) if backend == "gloo"
                 else dist.ProcessGroupNCCL(store, rank, world_size))
        return cls(rank, world_size, group, store)

    @property
    def leads(self) -> bool:
        """Rank 0: the one that records."""
        return self.rank == 0

    def part(self, count: int) -> slice:
        """This rank's contiguous share of `count` items (count is a multiple of world_size, checked by the config)."""
        size = count // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    # -- tensors -----------------------------------------------------------------------------------------------

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks (a detached copy; `tensor` itself with one process)."""
        if self.world_size == 1:
            return tensor
        total = tensor.detach().clone()
        self.group.allreduce([total]).wait()
        return total

    def max(self, value: float) -> float:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        largest = torch.tensor([value], dtype=torch.float64)
        self.group.allreduce([largest], dist.ReduceOp.MAX).wait()
        return largest.item()

    def weights(self, mask: torch.Tensor) -> Weights:
        """This rank's Weights for the batch whose completion tokens are `mask` (B, C), one row per sequence (1.0
        each with one process, so a term multiplied by them is unchanged bit for bit)."""
        if self.world_size == 1:
            return Weights()
        local = torch.tensor([float(mask.sum()), float(mask.shape[0])], dtype=torch.float64)
        total = self.sum(local).clamp(min=1.0)
        return Weights(tokens=(local[0] / total[0]).item(), sequences=(local[1] / total[1]).item())

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of `x` (one value per sequence) over every rank's sequences."""
        if self.world_size == 1:
            return x.mean()
        totals = self.sum(torch.stack([x.sum().double(), torch.tensor(float(x.numel()), dtype=torch.float64)]))
        return (totals[0] / totals[1]).to(x.dtype)

    def masked_mean(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """rl.losses.masked_mean over every rank's masked elements (no gradient across ranks)."""
        if self.world_size == 1:
            return masked_mean(x, mask)
        x = torch.where(mask.bool(), x, torch.zeros_like(x))
        totals = self.sum(torch.stack([x.sum().double(), mask.sum().double()]))
        return (totals[0] / totals[1].clamp(min=1.0)).to(x.dtype)

    def explained_variance(self, values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """rl.losses.explained_variance over every rank's tokens."""
        if self.world_size == 1:
            return explained_variance(values, returns, mask)
        variance_of_returns = self.masked_mean((returns - self.masked_mean(returns, mask)) ** 2, mask)
        if variance_of_returns == 0:
            return torch.tensor(float("nan"))
        errors = returns - values
        return 1 - self.masked_mean((errors - self.masked_mean(errors, mask)) ** 2, mask) / variance_of_returns

    def sum_values(self, values: dict[str, float | None]) -> dict[str, float | None]:
        """Per-key sums over the ranks of one update's statistics (each rank's share of the global value)."""
        if self.world_size == 1:
            return values
        keys = sorted(key for key, value in values.items() if value is not None)
        totals = self.sum(torch.tensor([values[key] for key in keys], dtype=torch.float64))
        return {**values, **dict(zip(keys, totals.tolist()))}

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its sum over the ranks (one all-reduce of one flat buffer); a
        parameter without a gradient on this rank contributes zeros."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = self.sum(torch.cat([g.flatten() for g in grads]))
        offset = 0
        for parameter in parameters:
            parameter.grad = flat[offset:offset + parameter.numel()].view_as(parameter).clone()
            offset += parameter.numel()

    # -- losses and statistics that are not plain means ---------------------------------------------------------

    def load_balancing_loss(self, router_logits, num_experts: int, top_k: int, attention_mask) -> torch.Tensor:
        """The router load-balancing loss of the global batch (transformers' load_balancing_loss_func), as this
        rank's share: the shares add up to the global loss, their gradients to its gradient. `router_logits` None:
        this rank holds no rows of the batch (it still joins the all-reduce, adding zeros)."""
        if self.world_size == 1:
            return load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)
        return load_balancing_share(router_logits, num_experts, top_k, attention_mask, self.sum)

    def sampler_mismatch(self, old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                         mask: torch.Tensor) -> tuple[float, float]:
        """rl.losses.sampler_mismatch over every rank's tokens."""
        if self.world_size == 1:
            return sampler_mismatch(old_logprobs, sampler_logprobs, mask)
        kl = self.masked_mean(kl_k3(sampler_logprobs, old_logprobs), mask).item()
        ratio = torch.exp(old_logprobs - sampler_logprobs)
        local = torch.where(mask.bool(), ratio, torch.zeros_like(ratio)).max().item() if mask.bool().any() else 0.0
        largest = self.max(local)
        return kl, largest if largest > 0 else 1.0

    # -- objects ---------------------------------------------------------------------------------------------

    def gather(self, key: str, value: object) -> list | None:
        """Every rank's `value`, in rank order, on rank 0 (None elsewhere); `key` names this exchange (unique per
        step). Goes through the store: a pickled object per rank, deleted once read."""
        if self.world_size == 1:
            return [value]
        self.store.set(f"{key}/{self.rank}", pickle.dumps(value))
        if not self.leads:
            return None
        values = []
        for rank in range(self.world_size):
            values.append(pickle.loads(self.store.get(f"{key}/{rank}")))
            self.store.delete_key(f"{key}/{rank}")
        return values


