"""MC label samplers: ``sample`` (curvlinops' labels per seed), ``sample_fast`` (the optimizer's).

``CategoricalLikelihood.sample_fast`` draws by the inverse CDF; its label frequencies are tested
against ``softmax`` with Pearson's chi-square statistic. Under a correct sampler the statistic of
``S`` draws per row, summed over rows, follows ``χ²`` with ``Σ (classes of p > 0 − 1)`` degrees of
freedom (asymptotically; every expected count here is at least 5, the textbook condition), so
the tests fail a correct sampler with probability ``ALPHA`` per seed. The seeds are fixed, and a
wrong sampler (labels shifted by one class, a CDF off by one entry, the rows mixed up) gives
statistics many times the degrees of freedom at these sample sizes, far beyond the threshold.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from torch import Tensor, nn

from kronfac.likelihoods import get_likelihood

ALPHA = 1e-6  # false-failure probability of a correct sampler, per test and seed


def chi_square_p_value(labels: Tensor, logits: Tensor) -> float:
    """The p-value of Pearson's statistic of ``labels [S, M]`` against ``softmax(logits [M, C])``.

    Classes of probability 0 must never be drawn (asserted) and add no degree of freedom.
    """
    S, (M, C) = labels.shape[0], logits.shape
    p = torch.softmax(logits.double(), dim=-1)
    counts = torch.stack([torch.bincount(labels[:, m], minlength=C) for m in range(M)])
    possible = p > 0
    assert not counts[~possible].any(), "a class of probability 0 was drawn"
    expected = S * p[possible]
    assert expected.min() >= 5, "too few draws for the chi-square approximation"
    statistic = float(((counts[possible] - expected) ** 2 / expected).sum())
    dof = int(possible.sum()) - M
    return float(stats.chi2.sf(statistic, dof))


def logits_of_several_shapes(dtype: torch.dtype) -> Tensor:
    """Rows: near uniform, peaked, a class of probability 0 (first, middle, last), two classes."""
    g = torch.Generator().manual_seed(0)
    C = 8
    rows = [
        0.1 * torch.randn(C, generator=g, dtype=dtype),
        torch.tensor([5.0] + [0.0] * (C - 1), dtype=dtype),
        torch.randn(C, generator=g, dtype=dtype),
        torch.randn(C, generator=g, dtype=dtype),
        torch.randn(C, generator=g, dtype=dtype),
        torch.tensor([1.0, -1.0] + [-torch.inf] * (C - 2), dtype=dtype),
    ]
    for row, k in ((2, 0), (3, C // 2), (4, C - 1)):
        rows[row][k] = -torch.inf
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_categorical_labels_follow_softmax(dtype) -> None:
    likelihood = get_likelihood(nn.CrossEntropyLoss())
    logits = logits_of_several_shapes(dtype)
    generator = torch.Generator().manual_seed(1)
    labels = likelihood.sample_fast(logits, 20000, generator)
    assert labels.shape == (20000, logits.shape[0])
    assert labels.dtype == torch.int64
    assert chi_square_p_value(labels, logits) > ALPHA


def test_fast_categorical_labels_follow_softmax_over_many_classes() -> None:
    """256 classes (a byte-level language model's), rows of different distributions."""
    likelihood = get_likelihood(nn.CrossEntropyLoss())
    g = torch.Generator().manual_seed(2)
    logits = 0.3 * torch.randn(8, 256, generator=g)
    labels = likelihood.sample_fast(logits, 4000, torch.Generator().manual_seed(3))
    assert chi_square_p_value(labels, logits) > ALPHA


def test_the_chi_square_test_rejects_a_wrong_sampler() -> None:
    """The test has power: labels of the neighbouring class, or of another row, are rejected."""
    likelihood = get_likelihood(nn.CrossEntropyLoss())
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    labels = likelihood.sample_fast(logits, 20000, torch.Generator().manual_seed(5))
    assert chi_square_p_value((labels + 1) % 8, logits) < 1e-100
    assert chi_square_p_value(labels.roll(1, dims=1), logits) < 1e-100


def test_reference_sampler_is_unchanged() -> None:
    """``sample`` keeps ``torch.multinomial``'s labels, one call per sample (curvlinops' order)."""
    likelihood = get_likelihood(nn.CrossEntropyLoss())
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(6))
    labels = likelihood.sample(logits, 3, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    p = torch.softmax(logits, dim=-1)
    expected = torch.cat(
        [torch.multinomial(p, 1, replacement=True, generator=g) for _ in range(3)], 1
    )
    assert torch.equal(labels, expected.T)


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.BCEWithLogitsLoss()])
def test_fast_sampler_of_the_other_losses_is_their_sampler(loss_fn) -> None:
    """Gaussian and Bernoulli draws are one number per entry already: the same labels."""
    likelihood = get_likelihood(loss_fn)
    terms = torch.randn(6, 3, generator=torch.Generator().manual_seed(8))
    fast = likelihood.sample_fast(terms, 2, torch.Generator().manual_seed(9))
    assert torch.equal(fast, likelihood.sample(terms, 2, torch.Generator().manual_seed(9)))
