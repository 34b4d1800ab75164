"""In-place weight sync from a transformers model trained in this process into a live `vllm.LLM` (CPU).

`make_llm` builds the engine and `push_weights` copies the model's current parameters into it (about
1 ms for the tiny models). Why this path (vLLM 0.32 CPU, transformers 5.19):

- vLLM's CPU loader repacks weights once loading is done: each linear layer's weight goes into a
  private oneDNN handle and the Parameter is swapped for an empty one (this is why TRL's
  `model.load_weights` sync fails with "'Parameter' object has no attribute 'weight_loader'"), and
  the fused-MoE expert tensors are rearranged in place (`prepack_moe_weight`).
- vLLM's own in-place `reload_weights` restores and re-processes layers, so it works for dense models.
  For MoE its "weight update" branch skips the CPU expert repack and copies unpacked weights into the
  packed buffers, so the experts serve wrong weights (clearing `quant_method.moe_kernel` first fixes it,
  at ~12 ms per push against ~2 ms for the path below).
- Fast path: `make_llm` turns vLLM's oneDNN linear dispatch off while the engine loads (and, for bfloat16 on
  CPUs with AMX, its SGLang packed-weight kernels, which it picks first for small weights). Linear layers
  then keep ordinary Parameters and run `F.linear`: logprobs are identical and generation is just as
  fast at these sizes. A push is then vLLM's own `model.load_weights`, which handles the q/k/v and
  gate/up stacking, plus a repack of each MoE layer's two expert tensors straight from transformers'
  fused `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]. vLLM uses the same layout.
- Rebuilding the engine from a saved checkpoint is also correct, but costs seconds per step.

Per family (specialists.families.FAMILIES; transformers 5.19 and vLLM 0.32 checked for each):

- Llama, Qwen2, Qwen3, Qwen3-MoE, OLMoE: vLLM's module names are transformers'; nothing else needed.
- Mixtral: transformers renames the checkpoint's `block_sparse_moe` to `mlp` when it loads; vLLM keeps
  `block_sparse_moe` (`VLLM_NAMES`). The expert layout is the same as Qwen3-MoE's.
- OLMo2: vLLM has no implementation of its own and serves it with its Transformers modeling backend,
  which decorates transformers' `Olmo2Model` class in place for torch.compile; `make_llm` undoes that
  once the engine is built (`_classes_kept`), or the training process could no longer build or run one.
- Expert tensors: all three MoE families keep transformers' fused [E, 2I, H] (gate rows, then up rows)
  and [E, H, I]; vLLM's CPU kernel wants [gate | up] too, zero-padded to its alignment (`_write_experts`).
- A bfloat16 engine (`dtype="bfloat16"`) gets the float32 weights cast on the way in.
- Several engines in one process (tests): an MoE engine after a dense one needs the process groups
  rebuilt (`_make_room_for_experts`), and an engine that shuts down (closed, or freed by the garbage collector
  at some later moment) must leave the groups to the others (`_keep_process_groups`).

Requirements: the engine must run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, which
`make_llm` sets), and `push_weights` resets vLLM's prefix cache, because cached KV blocks were
computed with the old weights.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from specialists.families import FAMILIES

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from vllm import LLM


# Module names vLLM 0.32 spells differently from transformers 5.19, per model_type: (transformers, vLLM).
VLLM_NAMES = {"mixtral": ((".mlp.", ".block_sparse_moe."),)}


def make_llm(model_dir: str | Path, *, seed: int = 0, max_model_len: int = 256, kv_cache_gib: float = 1.0,
             dtype: str = "float32", **llm_kwargs) -> "LLM":
    """An in-process vLLM engine whose weights `push_weights` can overwrite in place. float32 matches the
    training model's log-probabilities to ~1e-6; bfloat16 serves the same weights rounded to bfloat16.

    Cold start (first engine in a process, including the vllm import) takes ~10-40 s; later ones ~3 s.
    """
    # In-process engine core: push_weights reaches the model object directly (no pickling, no copies).
    # vLLM caches its environment when the first engine starts, so this must hold before then.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    kwargs = dict(model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=max_model_len, seed=seed,
                  # Explicit size: otherwise the CPU backend sizes the KV cache from system RAM. The legacy
                  # env VLLM_CPU_KVCACHE_SPACE (integer GiB only) overrides this when set.
                  kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
                  # Seeded requests must never be prefilled in chunks on CPU: vLLM rewinds a chunked request's
                  # generator with `set_offset`, which CPU generators lack ("CPU Generator does not use offset").
                  enable_chunked_prefill=False,
                  # No "Loading safetensors checkpoint shards" bar: our checkpoints load in milliseconds (the
                  # rest of what vLLM prints is silenced by experiments.console.silence_libraries).
                  use_tqdm_on_load=False)
    kwargs.update(llm_kwargs)
    model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    _keep_process_groups()
    _make_room_for_experts(model_type)
    with _plain_linear_weights(), _classes_kept(model_type):
        llm = LLM(**kwargs)
    _driver_worker(llm)  # fail now, not at the first push, if the engine is not in-process
    return llm


def push_weights(llm: "LLM", model: "PreTrainedModel") -> None:
    """Make `llm` serve exactly `model`'s current parameters (call after every optimiser step)."""
    renames = VLLM_NAMES.get(model.config.model_type, ())
    weights = []
    for name, param in model.named_parameters():
        for transformers_name, vllm_name in renames:
            name = name.replace(transformers_name, vllm_name)
        weights.append((name, param.detach()))
    _load_into_worker(_driver_worker(llm), weights)
    llm.reset_prefix_cache()


def _driver_worker(llm: "LLM"):
    executor = getattr(llm.llm_engine, "model_executor", None)
    if executor is None:
        raise RuntimeError("push_weights needs an in-process vLLM engine: set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
                           "before the first engine starts in this process (make_llm does)")
    return executor.driver_worker


@torch.no_grad()
def _load_into_worker(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    model = worker.model_runner.get_model()
    if "_weight_sync_checked" not in model.__dict__:  # once per engine
        if not (_linears_read_their_weight(model) and _experts_supported(model)):
            raise RuntimeError("push_weights needs an engine built by make_llm (plain linear weights, CPU MoE kernel)")
        model._weight_sync_checked = True
    _load_direct(model, weights)


def _load_direct(model: torch.nn.Module, weights: list[tuple[str, torch.Tensor]]) -> None:
    experts = _routed_experts(model)  # keyed by the transformers prefix, e.g. "model.layers.0.mlp.experts"
    rest, written = [], set()
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        if prefix in experts and leaf in ("gate_up_proj", "down_proj"):
            _write_experts(experts[prefix], leaf, tensor)
            written.add(name)
        else:
            rest.append((name, tensor))
    missing_experts = {f"{p}.{leaf}" for p in experts for leaf in ("gate_up_proj", "down_proj")} - written
    loaded = set(model.load_weights(rest))
    expected = {name for name, _ in model.named_parameters() if ".routed_experts." not in name}
    if missing_experts or expected - loaded:
        raise RuntimeError(f"weights not pushed: {sorted(missing_experts | (expected - loaded))}")


def _write_experts(layer: torch.nn.Module, leaf: str, tensor: torch.Tensor) -> None:
    """Repack transformers' fused expert tensor into the layer's CPU kernel layout (in place)."""
    destination = layer.w13_weight if leaf == "gate_up_proj" else layer.w2_weight
    tensor = tensor.to(destination.dtype)
    num_experts, rows, cols = destination.shape
    if tensor.shape != destination.shape:
        # vLLM zero-pads the expert intermediate size I to its kernel alignment P: w13 = [gate | 0 | up | 0].
        if leaf == "gate_up_proj":
            size, padded = tensor.shape[1] // 2, rows // 2
            padded_tensor = tensor.new_zeros(num_experts, rows, cols)
            padded_tensor[:, :size] = tensor[:, :size]
            padded_tensor[:, padded:padded + size] = tensor[:, size:]
        else:
            padded_tensor = tensor.new_zeros(num_experts, rows, cols)
            padded_tensor[:, :, :tensor.shape[2]] = tensor
        tensor = padded_tensor
    isa = layer.quant_method.moe_kernel.fused_experts.isa
    torch.ops._C.prepack_moe_weight(tensor.contiguous(), destination.data, isa)


def _routed_experts(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    return {name.removesuffix(".routed_experts"): module for name, module in model.named_modules()
            if isinstance(module, RoutedExperts)}


def _linears_read_their_weight(model: torch.nn.Module) -> bool:
    """True if every CPU linear kernel computes from `layer.weight` (not a prepacked private copy)."""
    for module in model.modules():
        kernel, weight = getattr(module, "cpu_linear", None), getattr(module, "weight", None)
        if kernel is None:
            continue
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.numel() == 0:
            return False
        x = torch.ones(1, weight.shape[1], dtype=weight.dtype)
        if kernel(x, torch.zeros_like(weight), None).abs().max() != 0:  # ignored the weight it was given
            return False
    return True


def _experts_supported(model: torch.nn.Module) -> bool:
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    for layer in _routed_experts(model).values():
        kernel = getattr(layer.quant_method, "moe_kernel", None)
        fused = getattr(kernel, "fused_experts", None)
        if not isinstance(fused, CPUUnquantizedExperts) or fused._use_zentorch or layer.w13_weight.dim() != 3:
            return False
    return True


def _make_room_for_experts(model_type: str) -> None:
    """vLLM creates its process groups once per process, with the first engine, and the expert-parallel group only
    when that engine serves a mixture of experts: a later MoE engine in the same process (a test session, a
    study script) then fails with "expert parallel group is not initialized". Dropping the groups lets the new
    engine create them all; an engine built earlier uses the new ones (one process: every group has size 1)."""
    from vllm.distributed import destroy_model_parallel, get_ep_group, model_parallel_is_initialized

    family = FAMILIES.get(model_type)
    if family is None or not family.mixture_of_experts or not model_parallel_is_initialized():
        return
    try:
        get_ep_group()
    except AssertionError:  # vLLM's way of saying the group does not exist
        destroy_model_parallel()


def _keep_process_groups() -> None:
    """Make an in-process engine's shutdown leave vLLM's process groups and torch.distributed's default group alone.

    vLLM's in-process engine shuts down when it is garbage-collected (a weakref.finalize of its client), and its
    `EngineCore.shutdown` ends with `cleanup_dist_env_and_memory`, which destroys the model-parallel groups and
    the default group of the whole process: the groups every other engine of the process reads in each forward
    (one process: each of size 1). An engine freed after another had started, at whatever moment the garbage
    collector frees it, thus left the live one failing with "pipeline model parallel group is not initialized"
    (the tests: test_weight_sync's engines, then the session's engine of test_vllm_parity). Here the shutdown
    keeps the groups and does the rest of the cleanup (vLLM's next engine in the process reuses the groups, as it
    does beside a live one); a vLLM without that function fails here, at the first engine."""
    import vllm.v1.engine.core as engine_core

    if engine_core.cleanup_dist_env_and_memory is not _cleanup_keeping_groups:
        engine_core.cleanup_dist_env_and_memory = _cleanup_keeping_groups


def _cleanup_keeping_groups(shutdown_ray: bool = False) -> None:
    """`vllm.distributed.parallel_state.cleanup_dist_env_and_memory` on CPU without destroying the groups: free
    what the engine left to the garbage collector (EngineCore.shutdown has unfrozen it already)."""
    gc.collect()


@contextmanager
def _plain_linear_weights():
    """While an engine loads inside the block, vLLM's CPU linear layers keep their weight Parameters and run
    F.linear, so that a push can write them. vLLM otherwise packs them: every weight into a private oneDNN
    handle, and on CPUs with AMX, bfloat16 weights small enough for SGLang's kernels (the routers, the
    projections of tiny models) for those first. Both choices are read at load time only."""
    import vllm._custom_ops as ops
    import vllm.model_executor.layers.utils as layer_utils

    supports_onednn, sgl_kernel_fits = ops._supports_onednn, layer_utils.check_cpu_sgl_kernel
    ops._supports_onednn = False
    layer_utils.check_cpu_sgl_kernel = lambda n, k, dtype: False
    try:
        yield
    finally:
        ops._supports_onednn, layer_utils.check_cpu_sgl_kernel = supports_onednn, sgl_kernel_fits


@contextmanager
def _classes_kept(model_type: str):
    """Restore the classes of transformers' modeling module for `model_type` as they were before the block.

    vLLM's Transformers modeling backend (OLMo2 in vLLM 0.32) decorates transformers' own model class in
    place for torch.compile: a new base class, `__init__` and `__call__`. Afterwards the class can no longer
    be built outside vLLM ("Current vLLM config is not set"), and a model built before it fails in forward
    ("no attribute 'do_not_compile'"). The engine's instance does not need the decoration with compilation
    off (`enforce_eager`): its forward is the plain one.
    """
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ModuleNotFoundError:
        module = None
    classes = [cls for _, cls in inspect.getmembers(module, inspect.isclass) if cls.__module__ == module.__name__] \
        if module else []
    saved = {cls: (cls.__bases__, dict(vars(cls))) for cls in classes}
    try:
        yield
    finally:
        for cls, (bases, attributes) in saved.items():
            if cls.__bases__ == bases:
                continue
            cls.__bases__ = bases
            for name in set(vars(cls)) - set(attributes):
                delattr(cls, name)
            for name, value in attributes.items():
                if vars(cls).get(name) is not value and name not in ("__dict__", "__weakref__"):
                    setattr(cls, name, value)
