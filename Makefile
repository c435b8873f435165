# Two entry points do all setup on a fresh machine with Python 3.11: `make demo` and `make test`.
# `make demo` installs the core package only (no torch); `make test` adds the test extras (torch, transformers
# for the parity tests, libtpu for the TPU ahead-of-time compile tests). Accelerator users add an extra:
#   make install EXTRAS=tpu      (Cloud TPU VMs: jax[tpu], libtpu)
#   make install EXTRAS=cuda12   (NVIDIA GPUs: the jax CUDA 12 plugin)
# `make eval-env` builds .venv-eval, a separate environment for the lmms-eval plugin: lmms-eval 0.7.3 requires
# av<16 (ours: 18.1.0) and torchvision, so it gets its own venv with this package installed editable and
# requirements/eval-constraints.txt holding torch (2.13.0, the CPU wheel) and our other pins. `make test` builds it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
EXTRAS ?=
CORE_STAMP := $(VENV)/.core-stamp$(if $(EXTRAS),-$(EXTRAS))
TEST_STAMP := $(VENV)/.test-stamp
EVAL_VENV := .venv-eval
EVAL_PY := $(EVAL_VENV)/bin/python
EVAL_STAMP := $(EVAL_VENV)/.eval-stamp
# Fake 8 CPU devices so sharding code paths run on a laptop / CI machine; the TPU compile tests load libtpu
# in both pytest workers and have no TPU metadata server to ask.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1
PYTEST_ARGS ?=

.PHONY: install eval-env format test demo clean

$(CORE_STAMP): setup.cfg pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip setuptools wheel
	$(VPY) -m pip install -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	@touch $(CORE_STAMP)

$(TEST_STAMP): $(CORE_STAMP)
	$(VPY) -m pip install -e '.[test]'
	# timm would pull torchvision (and with it a CUDA torch); the tests give it a stand-in.
	$(VPY) -m pip install --no-deps timm==1.0.31
	@touch $(TEST_STAMP)

# The venv writes a '*' .gitignore into itself, so the checkout stays clean without a root .gitignore entry.
$(EVAL_STAMP): setup.cfg pyproject.toml requirements/eval-constraints.txt
	@test -x $(EVAL_PY) || $(PYTHON) -m venv $(EVAL_VENV)
	@echo '*' > $(EVAL_VENV)/.gitignore
	$(EVAL_PY) -m pip install --upgrade pip setuptools wheel
	$(EVAL_PY) -m pip install -c requirements/eval-constraints.txt -e '.[eval]'
	# PyPI's torchvision is built against CUDA torch and cannot load beside the CPU wheel (no torchvision::nms);
	# lmms-eval imports it only in other models' backends, and transformers runs without it.
	$(EVAL_PY) -m pip uninstall -y torchvision
	@touch $(EVAL_STAMP)

install: $(CORE_STAMP)

eval-env: $(EVAL_STAMP)

# The tree's one format ([tool.pyink] in pyproject.toml): `make format` applies it, `make test` checks it first.
FORMAT_PATHS := kangaroo_jax train tools configs benchmarks tests

format: $(TEST_STAMP)
	$(VPY) -m pyink --quiet $(FORMAT_PATHS)

test: $(TEST_STAMP) $(EVAL_STAMP)
	$(VPY) -m pyink --check --quiet $(FORMAT_PATHS) || { echo "make test: run 'make format' (pyink, pyproject.toml)"; exit 1; }
	$(TEST_ENV) $(VPY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

demo: $(CORE_STAMP)
	JAX_PLATFORMS=cpu $(VPY) -m train.demo --fresh

clean:
	rm -rf $(VENV) $(EVAL_VENV) .cache build *.egg-info
