# `make serve` and `make test` work on a fresh machine: they create .venv, install the package with its
# test extras, fetch the default model into the user cache, then serve / run the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/smollm2-135m.yaml
PYTEST_ARGS ?=
# The installer: uv (installed into the venv by pip) resolves the same versions as pip and installs them in parallel,
# 38 s instead of 66 s on a fresh 2-core machine (BUILD.md). `make install INSTALLER=pip` uses pip alone, e.g. where
# only pip's configuration names the package index.
INSTALLER ?= uv
ifeq ($(INSTALLER),uv)
BOOTSTRAP = $(PY) -m pip install -q uv
INSTALL_CMD = $(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode
else
BOOTSTRAP = $(PY) -m pip install -q --upgrade pip
INSTALL_CMD = $(PY) -m pip install -q
endif

.PHONY: install model test test-fast serve bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BOOTSTRAP)
	$(INSTALL_CMD) -e '.[dev]'
	# The SGLang frontend is a test dependency for driving our server; --no-deps keeps PyTorch out.
	$(INSTALL_CMD) --no-deps 'sglang==0.5.10'
	touch $@

install: $(VENV)/.installed

model: install
	$(PY) -m sgl_jax.models.hub smollm2-135m

test: model
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

test-fast: model
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

serve: model
	$(PY) -m sgl_jax.serve --config $(CONFIG)

bench: model
	$(PY) bench/bench_model.py --quick

clean:
	rm -rf $(VENV) .pytest_cache
