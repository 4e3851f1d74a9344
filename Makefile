# Targets in the style of open-r1. Run them inside a virtual environment (see README).
.PHONY: install install-gpu quality style test test-slow test-all demo demo-quick eval

PYTHON ?= python
# CPU machines: the CPU build of torch first, so that nothing resolves to a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
MODEL ?= runs/bridge_tiny
OUTPUT_DIR ?= runs/eval

install:
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install "$(TORCH_CPU)"
	$(PYTHON) -m pip install -e ".[dev,deepspeed]"  # DeepSpeed runs on the CPU too: the ZeRO-3 tests use it

install-gpu:  # GPU machines: the default (CUDA) torch, DeepSpeed and vLLM
	$(PYTHON) -m pip install -e ".[dev,deepspeed,vllm]"

quality:
	ruff check bridge_trl examples tests benchmarks
	ruff format --check bridge_trl examples tests benchmarks

style:
	ruff check --fix bridge_trl examples tests benchmarks
	ruff format bridge_trl examples tests benchmarks

test:
	$(PYTHON) -m pytest -q

test-slow:
	$(PYTHON) -m pytest -q -m slow

test-all:
	$(PYTHON) -m pytest -q -m "slow or not slow"

demo:  # the toy reproduction of Figure 1: every method, 3 seeds, about 5 minutes on 2 CPU cores
	$(PYTHON) examples/reproduce_toy.py

demo-quick:
	$(PYTHON) examples/reproduce_toy.py --quick --output_dir runs/toy_quick

eval:
	$(PYTHON) -m bridge_trl.evaluate --model $(MODEL) --output_dir $(OUTPUT_DIR) $(EVAL_ARGS)
