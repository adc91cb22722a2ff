PYTHON ?= python

.PHONY: install demo test lint bench

# torch first: 2.13.0 is a CPU build that installs from the local disk; a bare `torch`
# requirement would pull a multi-GB CUDA build.
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev,hf,demo]"

demo: install
	kronfac demo

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks

bench:
	$(PYTHON) benchmarks/factors.py
