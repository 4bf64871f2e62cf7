# Set-up and everyday commands. `make demo` and `make test` work on a fresh checkout.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of PyTorch by default; override for a GPU machine, e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-deps test-matrix bench suite suite-quick clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# mamba_ssm without its CUDA build, for the tests of its model classes (optional: skipped if absent).
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $(PY) -m pip install -q --no-build-isolation "mamba-ssm>=2.2" einops \
		|| echo "mamba-ssm not installed: its tests will be skipped"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mambalrp.demo

# The default run leaves out the tests marked slow (each has a smoke version that runs here).
test: $(STAMP) test-deps
	$(PY) -m pytest -q -m "not slow" tests

# Everything, the slow tests included.
test-all: $(STAMP) test-deps
	$(PY) -m pytest -q tests

# Debian's chromium for the browser test of the HTML output (skipped without it). Only tried as
# root with apt-get at hand; never fails the build.
test-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& (apt-get install -y -q chromium >/dev/null 2>&1 || echo "chromium not installed: the browser test will be skipped"); } || true

# The model tests against the oldest, a middle and the newest supported transformers (noxfile.py).
test-matrix: $(STAMP)
	$(PY) -m nox

bench: $(STAMP)
	$(PY) -m benchmarks.core_scaling

suite: $(STAMP)
	$(PY) -m benchmarks.suite

suite-quick: $(STAMP)
	$(PY) -m benchmarks.suite --quick --out build/suite-quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .nox
