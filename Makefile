PYTHON ?= python

.PHONY: install install-peers demo test lint bench

# torch first: 2.13.0 is a CPU build that installs from the local disk; a bare `torch`
# requirement would pull a multi-GB CUDA build.
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev,hf,demo,plot]"

# The libraries tests/test_compat_*.py compare against (never dependencies of kronfac),
# without their heavy extras.
install-peers:
	$(PYTHON) -m pip install --quiet --no-deps curvlinops-for-pytorch==3.0.1 bayesian-lora==0.0.6
	$(PYTHON) -m pip install --quiet einops einconv linear_operator opt-einsum jaxtyping

demo: install
	kronfac demo

test:
	$(PYTHON) -m pytest -q

lint:
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks
	mypy src/kronfac

bench:
	$(PYTHON) benchmarks/factors.py
