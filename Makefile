# `make quickstart` and `make test` set everything up on a fresh machine (a .venv beside this file).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.leanvit-installed
# The tested torch build; on another machine set TORCH_SPEC="torch torchvision" (or your CUDA build).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: install quickstart lint test test-slow test-gpu gpu-check benchmark benchmark-compile benchmark-deploy accuracy accuracy-seg ablation clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,deploy,hub]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m experiments.run_quickstart

test: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow" --durations=15

# ruff (pyproject.toml): pyflakes, pycodestyle errors and warnings, import order; mypy on lightning_modules/,
# callbacks/ and datamodules/ (pyproject.toml)
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --durations=15

# The GPU path (tests/test_gpu.py): skipped without a GPU; DEVICE=cpu runs the same tests on this CPU.
# On a machine with torch but without this venv (a lent GPU): NO_INSTALL=1 PY=python3.
DEVICE ?= cuda
DEPS := $(if $(filter 1,$(NO_INSTALL)),,$(STAMP))
test-gpu: $(DEPS)
	LEANVIT_TEST_DEVICE=$(DEVICE) $(PY) -m pytest -q -m gpu tests/test_gpu.py --durations=10

# ONE time-boxed script for a GPU loan: test-gpu, the GPU grid (DeiT-T/S/B x every method x batch 1/32/256, eager
# fp32 and compiled bf16), the GPU section of BENCHMARKS.md. DEVICE=cpu: the same at tiny sizes, written to runs/.
gpu-check: $(DEPS)
	$(PY) -m experiments.gpu_check --device $(DEVICE)

# The standard grid (dense, ToMe r13, EViT 0.7, DynamicViT 0.7, A-ViT on DeiT-T and DeiT-S; batch 1 and 32,
# and 256 in bf16 on a GPU) on this machine; rewrites this device's section of BENCHMARKS.md.
benchmark: $(STAMP)
	$(PY) -m experiments.benchmark grid --output BENCHMARKS.md

# Every fixed-shape method of DeiT-S eager and torch.compile'd, batch 1 and 32, against the dense model both ways;
# rewrites this device's compile section of BENCHMARKS.md.
# Deployment (BENCHMARKS.md): every method exported and timed in ONNX Runtime (DeiT-T/S, batch 1 and 32), batch-1
# latency eager / compiled / ONNX Runtime (DeiT-S), and end to end from JPEG bytes (DeiT-S, batch 32)
benchmark-deploy: $(STAMP)
	$(PY) -m experiments.benchmark onnx --output BENCHMARKS.md --repeats 10
	$(PY) -m experiments.benchmark latency --output BENCHMARKS.md --repeats 30
	$(PY) -m experiments.benchmark end_to_end --output BENCHMARKS.md --repeats 8

benchmark-compile: $(STAMP)
	$(PY) -m experiments.benchmark compile --output BENCHMARKS.md

# Accuracy vs speed at small scale: a dense micro ViT from scratch on the canvas digits, every method fine-tuned
# from it with its recipe's structure (3 seeds of dense, ToMe, EViT, DynamicViT), the report; rewrites the accuracy section of
# BENCHMARKS.md (~20 min here).
accuracy: $(STAMP)
	$(PY) -m experiments.accuracy --output BENCHMARKS.md

# The same for semantic segmentation (experiments/canvas_seg/: the canvas digits' label maps, a mask transformer on
# every method's dense output); rewrites the segmentation accuracy section of BENCHMARKS.md.
accuracy-seg: $(STAMP)
	$(PY) -m experiments.accuracy --suite segmentation --output BENCHMARKS.md

# DynamicViT's recipe ablation on the canvas digits (effective batch, steps, predictor warm-up, policy eps); rewrites
# its section of BENCHMARKS.md (~15 min here on an idle machine). WEIGHTS=runs/canvas/dense_scratch/<version>/checkpoints/best.ckpt
# starts from a dense canvas checkpoint that make accuracy trained.
ablation: $(STAMP)
	$(PY) -m experiments.ablation $(if $(WEIGHTS),--weights $(WEIGHTS)) --output BENCHMARKS.md

clean:
	rm -rf runs wandb .pytest_cache
