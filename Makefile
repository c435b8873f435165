# Two entry points do all setup on a fresh machine with Python 3.11: `make demo` and `make test`.
# `make demo` installs the core package only (no torch); `make test` adds the test extras (torch, transformers
# for the parity tests, libtpu for the TPU ahead-of-time compile tests). Accelerator users add an extra:
#   make install EXTRAS=tpu      (Cloud TPU VMs: jax[tpu], libtpu)
#   make install EXTRAS=cuda12   (NVIDIA GPUs: the jax CUDA 12 plugin)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
EXTRAS ?=
CORE_STAMP := $(VENV)/.core-stamp$(if $(EXTRAS),-$(EXTRAS))
TEST_STAMP := $(VENV)/.test-stamp
# Fake 8 CPU devices so sharding code paths run on a laptop / CI machine; the TPU compile tests load libtpu
# in both pytest workers and have no TPU metadata server to ask.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1
PYTEST_ARGS ?=

.PHONY: install test demo clean

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

install: $(CORE_STAMP)

test: $(TEST_STAMP)
	$(TEST_ENV) $(VPY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

demo: $(CORE_STAMP)
	JAX_PLATFORMS=cpu $(VPY) -m train.demo --fresh

clean:
	rm -rf $(VENV) .cache build *.egg-info
