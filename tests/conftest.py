"""Fixtures of the test suite, and where its shared pieces live.

Structure:

- ``tests/helpers.py``: the zoo, as plain functions and classes imported with
  ``from helpers import ...``. A test builds its model or data with the seed and shapes it
  states, so a call reads better there than a fixture. One definition each of:

  - :func:`helpers.mlp`: the small MLP (widths, activation or one per gap, bias per layer,
    LayerNorm, seed, float64 fan-in or seeded PyTorch initialisation, dtype);
  - :func:`helpers.make_data` (with :func:`helpers.make_targets`, :func:`helpers.make_loss`):
    classification / regression batches of uneven sizes from private generators (CE, MSE, BCE;
    flat, sequence and image inputs), and :func:`helpers.split_batches` for data drawn at once;
  - :class:`helpers.PerPosition`: the per-position sequence model (``attention_mask`` keyword),
    with :func:`helpers.sequences`, :func:`helpers.padded` and :func:`helpers.padding_mask` for
    its unpadded and padded data;
  - :class:`helpers.CalledTwice` (and :func:`helpers.called_twice`): a module called twice,
    chained or side by side;
  - :func:`helpers.pi_damping`: the π-damping reference ``(δ_S, δ_A)``, and
    :func:`helpers.damped_inv`;
  - comparisons (:func:`helpers.assert_rel_close`, :func:`helpers.assert_factors_close`), the
    parameter layout, :func:`helpers.factors_like`, :func:`helpers.tiny_llama` with its LM
    batches and logits, :func:`helpers.require_peer`.

- ``tests/reference.py``: dense ``torch.func`` references (GGN, empirical Fisher, MC variance).
- ``tests/conftest.py`` (this file): the fixtures, for what is set up and torn down around
  tests: :func:`one_thread`, and :func:`syrk_everywhere`, which runs the whole suite with the
  BLAS syrk Gram kernel on every side (``tests/test_gram.py`` compares it with the forced
  ``addmm_`` fallback).
- A test file keeps a model or data set of its own only where it exists for that file's
  feature (a layout, a pooling network, a hand computation), and a one-line configuration of
  the zoo where many of its tests share one (``make_model`` in ``test_errors.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kronfac.linalg import gram_kernel


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny float64 problems (threads only add contention).

    Used as ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def syrk_everywhere() -> Iterator[None]:
    """Every factor sum by syrk wherever it applies, the tests' small sides included.

    ``"auto"`` would use syrk for sides of at least ``SYRK_MIN_SIDE`` only, which few test
    models reach; ``tests/test_gram.py`` forces the ``addmm_`` path as the reference.
    """
    with gram_kernel("syrk"):
        yield
