# The two commands of the README:
#   make demo   set up .venv, install, search + retrain on the embedded digits data set
#   make test   set up .venv, install, lint (ruff), run the test suite
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?= -q

.PHONY: setup demo test bench-memory clean

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/*.py csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	@# numpy before the build: setup.py imports torch, which warns "Failed to initialize NumPy" without it;
	@# ninja before the build: torch compiles the sources in parallel with it (serially without)
	$(PY) -c "import numpy, ninja" 2>/dev/null || $(PIP) install -q numpy ninja
	@echo "building the C++ CPU extension and installing the package: about a minute, pip prints nothing meanwhile"
	$(PIP) install -q --no-build-isolation -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) python/search.py --dataset digits --out runs/demo-search --resume
	$(PY) python/retrain.py --dataset digits --genotype runs/demo-search/genotype.json --out runs/demo-retrain --resume

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench-memory: setup
	$(PY) benchmarks/supernet_memory.py

clean:
	rm -rf runs build *.egg-info
