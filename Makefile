# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo run bench clean

install: $(STAMP)

# CPU torch from the wheel index when the machine has none; a GPU user installs their CUDA torch first.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Tests run in worker processes (pytest-xdist): a native crash in torch or onnxruntime fails that one test and the
# worker is replaced, never ending the run; each test file stays on one worker (its fixtures are built once).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

# The whole method on the built-in miniature (procedural identities, random miniature models): a few minutes on CPU.
# Configs are named as the package ships them (`digi2real config list`); configs/ links to src/digi2real/configs.
demo: $(STAMP)
	$(VENV)/bin/digi2real run demo

# The paper's recipe (a GPU, the hub weights, DigiFace-1M under data/, FFHQ under data/ffhq, benchmarks under
# data/benchmarks): see README.md.
run: $(STAMP)
	$(VENV)/bin/digi2real run digi2real-20k

bench: $(STAMP)
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_select.py
	$(PY) benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache
