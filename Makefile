# CheXficient developer commands. `make setup demo` then `make test`; CI (.ci/run) runs `make setup quality test`.
#
# Every target runs in one Python environment: the active virtualenv when there is one, else $(VENV), which
# `make setup` creates (a Debian/Ubuntu system Python refuses pip installs: PEP 668).
PYTHON ?= python3
VENV ?= .venv
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(abspath $(VENV))/bin/python
endif
# Nothing here downloads from the Hugging Face Hub: demos and tests run offline.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
EXTRAS := train,eval,deepspeed,dev,inference,llava,space,scale

.PHONY: setup venv browser demo eval-demo llava-demo space test quality style gpu-suite

setup: venv browser  ## what `make demo` and `make test` need: torch (CPU wheel), the project, Chromium, the transformers checks
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0  # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q -c .ci/constraints.txt -e ".[$(EXTRAS)]"
	$(PY) scripts/prepare_transformers_checks.py  # transformers' common tests; 4.46.3/4.57.6/5.25.0 in .cache/
	@echo "set up: $(PY)"

venv:
	@if [ ! -x "$(PY)" ]; then echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi

browser:  ## Debian's Chromium for the Space's browser test (apt as root or with sudo; no browser download)
	@if command -v chromium >/dev/null 2>&1 || [ -n "$$CHROMIUM_PATH" ]; then \
		echo "chromium: $$(command -v chromium || echo $$CHROMIUM_PATH)"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		echo "installing Debian's chromium with apt-get"; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
			chromium fonts-dejavu-core >/dev/null; \
	else \
		echo "error: no chromium and no apt-get: install Chromium and set CHROMIUM_PATH" >&2; exit 1; \
	fi

demo:  ## a warm start, then curated pretraining of a tiny model on the built-in phantoms; prints what it learnt
	$(PY) -m accelerate.commands.launch --num_processes 1 --cpu train/pretrain.py --config demo_foundation --cpu
	$(PY) -m accelerate.commands.launch --num_processes 1 --cpu train/pretrain.py --config demo_tiny --cpu

EVAL_OUT ?= outputs/eval_demo
EVAL_MODEL ?= outputs/demo/final
eval-demo:  ## every evaluation task on the demo model and the phantoms, then the results section (after `make demo`)
	$(PY) -m eval.zero_shot --model $(EVAL_MODEL) --dataset phantom --root outputs/demo/phantoms --out_dir $(EVAL_OUT)
	$(PY) -m eval.retrieval --model $(EVAL_MODEL) --dataset phantom --root outputs/demo/phantoms --out_dir $(EVAL_OUT)
	$(PY) -m eval.linear_probe --model $(EVAL_MODEL) --dataset phantom --root outputs/demo/phantoms --out_dir $(EVAL_OUT)
	$(PY) -m chexficient.phantoms outputs/phantom_seg --segmentation --num-train 160 --num-val 40 --num-test 80
	$(PY) -m eval.segmentation --model $(EVAL_MODEL) --dataset phantom_segmentation --root outputs/phantom_seg \
		--out_dir $(EVAL_OUT) --epochs 10 --decoder_channels 64,32,16,16,16
	$(PY) -m eval.report $(EVAL_OUT)

# the folder that llava_rad/configs/demo_stage*.yaml read and write
LLAVA_DEMO = outputs/llava_rad_demo
llava-demo:  ## LLaVA-Rad end to end on a tiny tower, a tiny Llama and phantoms: both stages, export, generate, metrics
	$(PY) -m llava_rad.demo --output_dir $(LLAVA_DEMO)
	$(PY) -m accelerate.commands.launch --cpu --num_processes 1 llava_rad/train.py --config demo_stage1
	$(PY) -m accelerate.commands.launch --cpu --num_processes 1 llava_rad/train.py --config demo_stage2
	$(PY) -m llava_rad.export --checkpoint $(LLAVA_DEMO)/stage2 --output $(LLAVA_DEMO)/export
	$(PY) -m llava_rad.generate --model $(LLAVA_DEMO)/export --manifest $(LLAVA_DEMO)/test.csv \
		--image_root $(LLAVA_DEMO)/phantoms --output $(LLAVA_DEMO)/predictions.jsonl
	$(PY) -m llava_rad.metrics --predictions $(LLAVA_DEMO)/predictions.jsonl --out $(LLAVA_DEMO)/metrics.json

space:  ## the Gradio Space on the demo model at http://127.0.0.1:7860 (after `make demo`)
	$(PY) space/app.py

test:  ## the test suite (offline, CPU)
	$(PY) -m pytest -q tests

gpu-suite:  ## one H100/H200, < 8 min: embedding, pretraining, LLaVA-Rad 7B speed -> benchmarks/results/gpu_suite_<gpu>.json
	$(PY) benchmarks/gpu_suite.py

quality:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

style:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
