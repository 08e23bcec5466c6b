# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

# CPU torch from the wheel index when the machine has none; a GPU user installs their CUDA torch first.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(VENV)/bin/digi2real demo -o demo-out

bench: $(STAMP)
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_select.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
