# CheXficient developer commands. `make setup demo` then `make test`.
PYTHON ?= python
VENV ?= .venv

.PHONY: setup demo test quality style

setup:  ## install torch (CPU wheel) first, then the project with every extra the tests need
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[train,eval,deepspeed,dev]"

demo:  ## curated pretraining of a tiny model on the built-in phantoms; prints the zero-shot result
	accelerate launch --num_processes 1 --cpu train/pretrain.py --config demo_tiny --cpu

test:  ## the test suite (offline, CPU)
	$(PYTHON) -m pytest -q tests

quality:
	ruff check .
	ruff format --check .

style:
	ruff check --fix .
	ruff format .
