# Two commands on a fresh machine:  `make demo` (the app on the bundled tiny model) and `make test`.
# Each creates .venv and installs everything on first use; re-running is fast when nothing changed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The torch/torchvision pair CI uses (HF's Llama 4 image processor needs torchvision). Override for
# other platforms, e.g. `make test TORCH="torch torchvision"`.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: test test-fast demo lab lint bench clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[apps,notebooks,attribution,dev,report]"
	touch $(STAMP)

# Headless Chromium for the browser tests (Debian package; never downloaded by Playwright).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium)); \
	  else echo "install Chromium (package 'chromium') for the browser tests"; exit 1; fi; }

test: $(STAMP) browser
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not browser"

demo: $(STAMP)
	$(PY) scripts/demo.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

lint: $(STAMP)
	$(VENV)/bin/ruff check workbench probes apps tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/forward.py
	$(PY) benchmarks/record.py

clean:
	rm -rf $(VENV) .pytest_cache runs artifacts
