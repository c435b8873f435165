# Two entry points do all setup on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Fake 8 CPU devices so sharding code paths run on a laptop / CI machine.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
	JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
PYTEST_ARGS ?=

.PHONY: install test demo clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip setuptools wheel
	$(VPY) -m pip install -e '.[test]'
	# timm would pull torchvision (and with it a CUDA torch); the tests give it a stand-in.
	$(VPY) -m pip install --no-deps timm==1.0.31
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(TEST_ENV) $(VPY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(VPY) -m train.demo --fresh

clean:
	rm -rf $(VENV) .cache build *.egg-info
