# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Everything (venv, dependencies, the compiled extension) is set up on the way, and gradwatch is
# installed into the venv in editable mode: `.venv/bin/gradwatch` and `import gradwatch` work from
# any folder, and edits to the Python files take effect without reinstalling.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export MAX_JOBS ?= 2

.PHONY: venv build demo test lint bench bench-quick clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install $(TORCH_PINS) ninja pybind11 pytest ruff matplotlib tqdm tensorboard zclip lightning \
		"transformers>=5,<6" accelerate
	touch $@

# The editable install builds gradwatch._C in place against the venv's torch (no build isolation:
# the extension must be compiled against the torch it runs with) and installs the console script.
$(VENV)/.editable: $(VENV)/.installed setup.py pyproject.toml
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

# Rebuilds gradwatch._C in place after csrc/ changes (ninja: quick when nothing changed).
build: $(VENV)/.editable
	$(PY) setup.py build_ext --inplace

demo: build
	$(PY) -m gradwatch demo

test: build
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: build
	$(PY) -m benchmarks

bench-quick: build
	$(PY) -m benchmarks --quick

clean:
	rm -rf build gradwatch/_C*.so *.egg-info $(VENV)/.editable
