# The two commands of the README (`make demo`, `make test`) set everything up on a fresh machine.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
DATA_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_WORKERS ?= 2
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup data build torch demo test test-fast test-jax test-torch bench clean dist info study study-plan gpu-harness-emu gpu-harness

setup: $(STAMP)

$(STAMP): pyproject.toml setup.cfg setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,examples]"
	touch $@

# Real Fashion-MNIST from Debian's package (installed when missing and running as root).
data:
	@if [ -f $(DATA_DIR)/train-images-idx3-ubyte.gz ] || [ -f $(DATA_DIR)/train-images-idx3-ubyte ]; then \
	  echo "Fashion-MNIST found in $(DATA_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	else \
	  echo "Fashion-MNIST is missing from $(DATA_DIR). Install it with 'sudo apt-get install dataset-fashion-mnist'"; \
	  echo "or put the four IDX files in a folder and run 'make demo DATA_DIR=that/folder'."; exit 1; \
	fi

# Compiles the fused op into its cache. Never fails the build: without a compiler the
# package uses the reference path (the command says why).
build: setup
	-$(PY) -m tf_proxynorm.build

info: setup
	$(PY) -m tf_proxynorm.info

demo: setup data build
	$(PY) examples/demo.py --data_dir $(DATA_DIR) $(if $(DEMO_DIR),--model_dir=$(DEMO_DIR))

# The whole suite on the TensorFlow backend, then the backend-neutral tests (tests/backends)
# again on JAX and on PyTorch, each backend in its own pytest process. On JAX most of the
# time is XLA compiling many tiny programs: the lowest LLVM optimization level compiles them
# ~10x faster (the same operations; the tests' tolerances are unchanged).
JAX_ENV := KERAS_BACKEND=jax XLA_FLAGS=--xla_backend_optimization_level=0
TORCH_STAMP := $(VENV)/.torch-stamp

test: setup build torch
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 tests
	$(JAX_ENV) $(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=5 tests/backends
	KERAS_BACKEND=torch $(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=5 tests/backends

test-fast: setup build torch
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" tests
	$(JAX_ENV) $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" tests/backends
	KERAS_BACKEND=torch $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" tests/backends

test-jax: setup
	$(JAX_ENV) $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests/backends

test-torch: setup torch
	KERAS_BACKEND=torch $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests/backends

# PyTorch's CPU build (about 190 MB; PyPI's default Linux wheel pulls GB of CUDA libraries):
# a local copy of it where pip finds one, otherwise PyTorch's CPU package index.
torch: $(TORCH_STAMP)

$(TORCH_STAMP): $(STAMP)
	$(PY) -m pip install -q "torch==2.13.0+cpu" 2>/dev/null || \
	  $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu || \
	  { echo "Could not install PyTorch's CPU build, needed by the PyTorch backend tests."; exit 1; }
	touch $@

bench: setup build
	$(PY) benchmarks/bench_norm.py

# The accuracy study of docs/results.md (about 2.5 h of CPU, then 10 min of CBN ablation;
# resumable: rerun to continue).
study: setup data build
	$(PY) examples/compare_norms.py --data_dir $(DATA_DIR)
	$(PY) examples/compare_norms.py --data_dir $(DATA_DIR) --cbn_ablation

study-plan: setup
	$(PY) examples/compare_norms.py --dry_run

# The CUDA kernel source on a CPU emulator against the float64 reference (no GPU needed),
# and on a GPU machine: parity and ResNet-50 timings (nvcc + PyTorch or CuPy, no TensorFlow).
gpu-harness-emu: setup
	$(PY) custom_ops/gpu_test/run_harness.py --check --emulate --quick

gpu-harness:
	$(PYTHON) custom_ops/gpu_test/run_harness.py --check --bench

# The sdist and the wheel (both carry the op sources of custom_ops/), checked with twine.
dist: setup
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .
	$(PY) -m twine check --strict dist/*

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
