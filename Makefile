# The README's two commands: `make demo` and `make test`. Each does all set-up first
# (virtual environment, pinned dependencies, the compiled extension), once.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
SOURCES = $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp kernels/*.h kernels/*.cuh kernels/*.cu) setup.py

.PHONY: setup demo test bench gpu-check clean

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

# On a CUDA machine: build, every needs_cuda test, CUDA vs CPU checks, benchmarks, one JSON
# (bench/results/gpu_check.json) in under 8 minutes; docs/gpu_check.md. GPU_CHECK_ARGS=--dry-run
# runs it on the CPU.
gpu-check: setup
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info fastacd/_C*.so
