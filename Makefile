# The README's two commands: `make demo` and `make test`. Each does all set-up first
# (virtual environment, pinned dependencies, the compiled extension), once.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
SOURCES = $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp kernels/*.h kernels/*.cuh kernels/*.cu) setup.py

.PHONY: setup demo test bench clean

setup: $(VENV)/.built

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES) pyproject.toml
	$(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import fastacd; print(fastacd.build_info())"
	touch $@

demo: setup
	$(PY) -m fastacd demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m fastacd bench

clean:
	rm -rf build *.egg-info fastacd/_C*.so
