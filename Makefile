# CheXficient developer commands. `make setup demo` then `make test`.
PYTHON ?= python
VENV ?= .venv

.PHONY: setup demo eval-demo llava-demo space test quality style

setup:  ## install torch (CPU wheel) first, then the project with every extra the tests need
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[train,eval,deepspeed,dev,inference,llava,space]"

demo:  ## curated pretraining of a tiny model on the built-in phantoms; prints the zero-shot result
	accelerate launch --num_processes 1 --cpu train/pretrain.py --config demo_tiny --cpu

EVAL_OUT ?= outputs/eval_demo
EVAL_MODEL ?= outputs/demo/final
eval-demo:  ## every evaluation task on the demo model and the phantoms, then the results section (after `make demo`)
	$(PYTHON) -m eval.zero_shot --model $(EVAL_MODEL) --dataset phantom --root outputs/demo/phantoms --out_dir $(EVAL_OUT)
	$(PYTHON) -m eval.retrieval --model $(EVAL_MODEL) --dataset phantom --root outputs/demo/phantoms --out_dir $(EVAL_OUT)
	$(PYTHON) -m eval.linear_probe --model $(EVAL_MODEL) --dataset phantom --root outputs/demo/phantoms --out_dir $(EVAL_OUT)
	$(PYTHON) -m train.phantoms outputs/phantom_seg --segmentation --num-train 160 --num-val 40 --num-test 80
	$(PYTHON) -m eval.segmentation --model $(EVAL_MODEL) --dataset phantom_segmentation --root outputs/phantom_seg \
		--out_dir $(EVAL_OUT) --epochs 10 --decoder_channels 64,32,16,16,16
	$(PYTHON) -m eval.report $(EVAL_OUT)

# the folder that llava_rad/configs/demo_stage*.yaml read and write
LLAVA_DEMO = outputs/llava_rad_demo
llava-demo:  ## LLaVA-Rad end to end on a tiny tower, a tiny Llama and phantoms: both stages, export, generate, metrics
	$(PYTHON) -m llava_rad.demo --output_dir $(LLAVA_DEMO)
	accelerate launch --cpu --num_processes 1 llava_rad/train.py --config demo_stage1
	accelerate launch --cpu --num_processes 1 llava_rad/train.py --config demo_stage2
	$(PYTHON) -m llava_rad.export --checkpoint $(LLAVA_DEMO)/stage2 --output $(LLAVA_DEMO)/export
	$(PYTHON) -m llava_rad.generate --model $(LLAVA_DEMO)/export --manifest $(LLAVA_DEMO)/test.csv \
		--image_root $(LLAVA_DEMO)/phantoms --output $(LLAVA_DEMO)/predictions.jsonl
	$(PYTHON) -m llava_rad.metrics --predictions $(LLAVA_DEMO)/predictions.jsonl --out $(LLAVA_DEMO)/metrics.json

space:  ## the Gradio Space on the demo model at http://127.0.0.1:7860 (after `make demo`)
	$(PYTHON) space/app.py

test:  ## the test suite (offline, CPU)
	$(PYTHON) -m pytest -q tests

quality:
	ruff check .
	ruff format --check .

style:
	ruff check --fix .
	ruff format .
