"""Shared fixtures: one tiny pretrained model per kind per test session (pretraining takes seconds); thread
counts pinned for this process and every process it starts (`processes.py`)."""

import os

import pytest

from processes import TEST_THREADS, THREAD_VARIABLES
from specialists.config import EvaluationSettings, ModelSettings, PretrainSettings, SpecialistsConfig


def pytest_configure(config):
    """Before any test module is imported: the same thread count in this process (torch) and in every
    subprocess (the OpenMP/MKL/OpenBLAS variables it inherits; helpers also pass them explicitly)."""
    os.environ.update({name: str(TEST_THREADS) for name in THREAD_VARIABLES})
    import torch

    torch.set_num_threads(TEST_THREADS)


TINY_PRETRAIN = PretrainSettings(num_examples=600, batch_size=32)


def tiny_model(kind: str = "moe") -> ModelSettings:
    """The smallest model vLLM accepts on CPU: 2 layers, hidden 64, 4 experts of 128."""
    return ModelSettings(kind=kind, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, expert_size=128)


def tiny_config(kind: str = "moe", seed: int = 0) -> SpecialistsConfig:
    return SpecialistsConfig(seed=seed, model=tiny_model(kind), pretrain=TINY_PRETRAIN,
                             evaluation=EvaluationSettings(num_problems=16, max_new_tokens=48))


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    from specialists.pretrain import pretrain

    return pretrain(tiny_config("moe"), tmp_path_factory.mktemp("tiny-moe"), progress=False)


@pytest.fixture(scope="session")
def tiny_dense_dir(tmp_path_factory):
    from specialists.pretrain import pretrain

    return pretrain(tiny_config("dense"), tmp_path_factory.mktemp("tiny-dense"), progress=False)


@pytest.fixture(scope="session")
def vllm_moe(tiny_moe_dir):
    """One vLLM engine on the tiny MoE for the whole session (an engine takes 10-40 s to start on CPU).
    Tests that push other weights into it must push the checkpoint's weights back when done."""
    from rl.engines import VLLMEngine
    from specialists.tokenizer import load_tokenizer

    engine = VLLMEngine(tiny_moe_dir, load_tokenizer(tiny_moe_dir), max_length=256, seed=0)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_moe_bf16(tiny_moe_dir):
    """The rollout engine `[rl.engine] dtype = "bfloat16"` builds (rl.engines.make_engine) on the tiny MoE, for the
    whole session: it serves the float32 weights rounded to bfloat16. The same contract as `vllm_moe`."""
    from rl.config import EngineSettings
    from rl.engines import make_engine
    from specialists.model import load_model
    from specialists.tokenizer import load_tokenizer

    engine = make_engine(EngineSettings(kv_cache_gib=0.25, dtype="bfloat16"), tiny_moe_dir, load_model(tiny_moe_dir),
                         load_tokenizer(tiny_moe_dir), max_length=256, seed=0)
    yield engine
    engine.close()
