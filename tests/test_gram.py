"""The Gram kernels of ``kronfac.linalg.gram``: BLAS syrk into one triangle against ``addmm_``.

1. ``accumulate_gram`` by syrk equals the GEMM path to round-off (float64 ``1e-12``, float32
   ``1e-5`` relative) for rows first and channels first, writes the accumulator's memory in place
   and fills its upper triangle only; ``symmetrize_`` restores an exactly symmetric matrix.
2. ``"auto"`` picks syrk for large contiguous CPU float sides only, ``addmm_`` / ``baddbmm_``
   otherwise (small sides, half precision, strided rows, groups).
3. Every factor path — Linear (joint and separate bias), Conv2d with groups, Embedding,
   sequences with masks, the optimizer's running factors, EKFAC — gives the same factors under
   ``"syrk"`` and under the forced ``"gemm"`` fallback, exactly symmetric.

The suite runs with ``"syrk"`` (``tests/conftest.py``); the tests here force each kernel. The
models' factors are full rank: with a rank-deficient factor the optimizer's EKFAC step moves by
O(1) under round-off perturbations of the data whichever kernel runs (its eigenbasis of the null
space is arbitrary), so the two kernels could not be compared there.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    DT,
    PerPosition,
    assert_rel_close,
    gen,
    init,
    make_data,
    mlp,
    padded,
    padding_mask,
    randn,
    sequences,
)
from torch import nn

import kronfac
from kronfac.linalg import accumulate_gram, gram_kernel, set_gram_kernel, symmetrize_
from kronfac.linalg import gram as gram_module
from kronfac.linalg.gram import SYRK_MIN_SIDE
from kronfac.optim import KFACPreconditioner

pytestmark = pytest.mark.usefixtures("one_thread")

CE = nn.CrossEntropyLoss()
TOLS = {torch.float64: 1e-12, torch.float32: 1e-5}


def gram(C0, x, groups=1, alpha=1.0, kernel="syrk"):
    """A copy of ``C0`` after ``accumulate_gram`` with ``kernel``, and its memory address."""
    C = C0.clone()
    ptr = C.data_ptr()
    with gram_kernel(kernel):
        accumulate_gram(C, x, groups, alpha)
    assert C.data_ptr() == ptr
    return C


def reference(C0, x, groups=1, alpha=1.0):
    """``C0 + α Σ x xᵀ`` per group, in float64 by einsum."""
    rows = x.reshape(-1, groups, x.shape[-1] // groups).double()
    R = torch.einsum("mgi,mgj->gij", rows, rows)
    return C0.double() + alpha * (R[0] if groups == 1 else R)


# -- 1. the kernels ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["rows-first", "channels-first"])
def test_syrk_fills_the_upper_triangle_in_place_and_equals_gemm(dtype, layout):
    g = gen(0)
    d = 7
    if layout == "rows-first":
        x = randn(5, 3, d, g=g, dtype=dtype)  # [m, T, d], contiguous
    else:
        x = randn(5, d, 3, g=g, dtype=dtype).transpose(1, 2)  # [m, T, d], a transposed view
    C0 = randn(d, d, g=g, dtype=dtype)
    C0 = C0 @ C0.T
    syrk = gram(C0, x, alpha=0.3, kernel="syrk")
    gemm = gram(C0, x, alpha=0.3, kernel="gemm")
    expected = reference(C0, x, alpha=0.3)
    # syrk writes the upper triangle and leaves the strict lower one as it was
    assert torch.equal(syrk.tril(-1), C0.tril(-1))
    assert_rel_close(syrk.triu(), expected.triu(), TOLS[dtype], "syrk upper triangle")
    assert_rel_close(gemm, expected, TOLS[dtype], "gemm")
    for C in (syrk, gemm):
        S = symmetrize_(C)
        assert S is C and torch.equal(S, S.T)
        assert_rel_close(S, expected, TOLS[dtype], "symmetrised")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["rows-first", "channels-first"])
@pytest.mark.parametrize("block", [3, 7, 256])
def test_triangular_blocks_fill_the_upper_triangle_in_place(dtype, layout, block, monkeypatch):
    """``"blocks"``: row blocks of ``block`` rows (3 and 7 cut the side 7 unevenly / not at all)."""
    monkeypatch.setattr(gram_module, "TRIANGLE_BLOCK", block)
    g = gen(4)
    d = 7
    if layout == "rows-first":
        x = randn(5, 3, d, g=g).to(dtype)
    else:
        x = randn(5, d, 3, g=g).to(dtype).transpose(1, 2)
    C0 = torch.zeros(d, d, dtype=dtype)
    C = gram(C0, x, alpha=0.3, kernel="blocks")
    expected = reference(C0, x, alpha=0.3)
    if block < d:  # blocks below the diagonal are never written
        assert torch.equal(C.tril(-block), C0.tril(-block))
    tol = 1e-2 if dtype == torch.bfloat16 else TOLS[dtype]
    assert_rel_close(symmetrize_(C), expected, tol, "blocks")


@pytest.mark.parametrize(("dtype", "strided"), [(torch.bfloat16, False), (torch.float32, True)])
def test_auto_splits_into_triangular_blocks_where_syrk_does_not_apply(dtype, strided, monkeypatch):
    monkeypatch.setattr(gram_module, "TRIANGLE_BLOCK", 4)
    rows = torch.randn(16, 18 if strided else 9, generator=gen(6)).to(dtype)
    if strided:
        rows = rows[:, ::2]
    C0 = torch.zeros(9, 9, dtype=dtype)
    C = gram(C0, rows, kernel="auto")
    upper = torch.ones(9, 9, dtype=torch.bool).triu()
    assert (C.tril(-4) == 0).all() and (C[upper] != 0).all()  # blocks of 4 rows
    tol = 1e-2 if dtype == torch.bfloat16 else TOLS[dtype]
    assert_rel_close(symmetrize_(C), reference(C0, rows), tol, "auto blocks")


def test_triangular_blocks_leave_groups_to_baddbmm():
    x = torch.randn(9, 2 * 5, generator=gen(5), dtype=DT)
    C0 = torch.zeros(2, 5, 5, dtype=DT)
    assert_rel_close(gram(C0, x, groups=2, kernel="blocks"), reference(C0, x, groups=2), 1e-12)


def test_symmetrize_is_batched_and_keeps_the_upper_triangle():
    C = torch.arange(2 * 9, dtype=DT).reshape(2, 3, 3)
    upper = C.triu().clone()
    symmetrize_(C)
    assert torch.equal(C, C.mT) and torch.equal(C.triu(), upper)


def test_kernel_choice_is_validated_and_restored():
    with pytest.raises(ValueError, match="Unknown Gram kernel 'blas'"):
        set_gram_kernel("blas")
    previous = set_gram_kernel("gemm")
    try:
        with gram_kernel("auto"):
            assert set_gram_kernel("auto") == "auto"
        assert set_gram_kernel("gemm") == "gemm"
    finally:
        set_gram_kernel(previous)


# -- 2. what "auto" picks ----------------------------------------------------------------------
def _used_syrk(C0, x):
    """Whether ``"auto"`` left the zero strict lower triangle alone (syrk) or filled it (GEMM)."""
    return bool((gram(C0, x, kernel="auto").tril(-1) == 0).all())


@pytest.mark.parametrize(
    ("side", "dtype", "strided", "expected"),
    [
        (SYRK_MIN_SIDE, torch.float32, False, True),
        (SYRK_MIN_SIDE, torch.float64, False, True),
        (SYRK_MIN_SIDE - 1, torch.float32, False, False),
        (SYRK_MIN_SIDE, torch.bfloat16, False, False),
        (SYRK_MIN_SIDE, torch.float32, True, False),
    ],
)
def test_auto_uses_syrk_for_large_contiguous_float_sides(side, dtype, strided, expected):
    rows = torch.randn(16, 2 * side if strided else side, generator=gen(2)).to(dtype)
    if strided:  # every other column: a [16, side] view SciPy would have to copy
        rows = rows[:, ::2]
    assert rows.shape[-1] == side and rows.is_contiguous() is not strided
    C0 = torch.zeros(side, side, dtype=dtype)
    assert _used_syrk(C0, rows) is expected
    C = gram(C0, rows, kernel="auto")
    symmetrize_(C)
    tol = 1e-2 if dtype == torch.bfloat16 else TOLS[dtype]
    assert_rel_close(C, reference(C0, rows), tol, "auto")


def test_groups_use_baddbmm():
    x = torch.randn(9, 2 * SYRK_MIN_SIDE, generator=gen(3), dtype=DT)
    C0 = torch.zeros(2, SYRK_MIN_SIDE, SYRK_MIN_SIDE, dtype=DT)
    C = gram(C0, x, groups=2, kernel="syrk")
    assert (C.tril(-1) != 0).any()  # the full GEMM
    assert_rel_close(C, reference(C0, x, groups=2), TOLS[DT], "grouped")


# -- 3. the factors ----------------------------------------------------------------------------
def both_kernels(fn):
    """``fn()`` under ``"syrk"`` and under ``"gemm"``."""
    with gram_kernel("syrk"):
        syrk = fn()
    with gram_kernel("gemm"):
        gemm = fn()
    return syrk, gemm


def assert_same_factors(syrk, gemm, tol, what):
    assert list(syrk) == list(gemm)
    for name in gemm:
        for side, a, b in zip("AS", syrk[name], gemm[name], strict=True):
            if a.ndim >= 2:  # dense (a diagonal input factor is token counts)
                assert torch.equal(a, a.mT), f"{what}: {side} of {name} is not symmetric"
            assert_rel_close(a, b, tol, f"{what} {side} of {name}")


def _mlp_case(dtype):
    model = mlp((6, 5, 4), seed=1, dtype=dtype)
    return model, CE, make_data(model, "ce", (7, 4), (6,), seed=10, dtype=dtype), {}


def _grouped_conv_case(dtype):
    conv = nn.Conv2d(4, 6, 3, groups=2)
    model = init(nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), seed=2)
    model.append(init(nn.Linear(6, 3), seed=3))  # full-rank factors (module docstring)
    model.append(nn.Tanh())
    model.append(init(nn.Linear(3, 3), seed=4))
    model = model.to(dtype)
    return model, CE, make_data(model, "ce", (12, 9), (4, 5, 5), seed=11, dtype=dtype), {}


def _conv_case(dtype):
    model = init(nn.Sequential(nn.Conv2d(3, 5, 3), nn.Tanh(), nn.Flatten()), seed=5)
    model.append(init(nn.Linear(5 * 16, 3), seed=6))
    model = model.to(dtype)
    return model, CE, make_data(model, "ce", (4, 2), (3, 6, 6), seed=12, dtype=dtype), {}


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 5, padding_idx=0)
        self.hidden = nn.Linear(5, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, idx):
        return self.out(torch.tanh(self.hidden(self.emb(idx)))).transpose(1, 2)


def _embedding_case(dtype):
    g = gen(13)
    model = init(_Tokens(), seed=7).to(dtype)
    data = [(torch.randint(0, 9, (3, 5), generator=g), torch.randint(0, 4, (3, 5), generator=g))]
    return model, CE, data, {}


def _masked_sequences_case(dtype):
    lengths, T = (4, 2, 3), 4
    xs, _, cls = sequences(lengths, d_in=4, classes=3, seed=14)
    X = {"x": padded(xs, T, 3.0).to(dtype), "attention_mask": padding_mask(lengths, T)}
    y = padded(cls, T, -100)
    model = PerPosition(mlp((4, 6, 3), seed=8, dtype=dtype), class_dim_1=True)
    return model, CE, [(X, y)], {"forward": lambda m, X: m(**X)}


CASES = {
    "linear": _mlp_case,
    "conv2d": _conv_case,
    "grouped-conv2d": _grouped_conv_case,
    "embedding": _embedding_case,
    "masked-sequences": _masked_sequences_case,
}


OPTIONS = [{}, {"bias": "separate"}, {"approx": "reduce"}]
# embeddings support approx="expand" only
CASE_OPTIONS = [
    (case, options)
    for case in CASES
    for options in OPTIONS
    if not (case == "embedding" and options.get("approx") == "reduce")
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fisher", ["mc", "empirical", "type-2"])
@pytest.mark.parametrize(("case", "options"), CASE_OPTIONS)
def test_factors_by_syrk_equal_the_gemm_fallback(case, options, fisher, dtype):
    model, loss_fn, data, extra = CASES[case](dtype)
    syrk, gemm = both_kernels(
        lambda: kronfac.compute_factors(model, loss_fn, data, fisher=fisher, **options, **extra)
    )
    assert_same_factors(syrk, gemm, TOLS[dtype], f"{case} {fisher} {options}")


@pytest.mark.parametrize("case", ["linear", "grouped-conv2d", "conv2d", "masked-sequences"])
def test_factors_by_triangular_blocks_equal_the_gemm_fallback(case, monkeypatch):
    monkeypatch.setattr(gram_module, "TRIANGLE_BLOCK", 2)
    model, loss_fn, data, extra = CASES[case](torch.float64)
    with gram_kernel("blocks"):
        blocks = kronfac.compute_factors(model, loss_fn, data, fisher="type-2", **extra)
    with gram_kernel("gemm"):
        gemm = kronfac.compute_factors(model, loss_fn, data, fisher="type-2", **extra)
    assert_same_factors(blocks, gemm, TOLS[torch.float64], f"{case} blocks")


def test_large_sides_by_auto_equal_the_gemm_fallback():
    """Sides above ``SYRK_MIN_SIDE`` (syrk under ``"auto"``), joint bias: ``[d + 1, d + 1]``."""
    model = mlp((SYRK_MIN_SIDE + 4, SYRK_MIN_SIDE, 3), seed=9, dtype=torch.float32)
    data = make_data(model, "ce", (33, 20), (SYRK_MIN_SIDE + 4,), seed=15, dtype=torch.float32)
    with gram_kernel("auto"):
        auto = kronfac.compute_factors(model, CE, data)
    with gram_kernel("gemm"):
        gemm = kronfac.compute_factors(model, CE, data)
    assert_same_factors(auto, gemm, TOLS[torch.float32], "auto")


@pytest.mark.parametrize("case", ["linear", "grouped-conv2d", "masked-sequences"])
def test_ekfac_by_syrk_equals_the_gemm_fallback(case):
    model, loss_fn, data, extra = CASES[case](torch.float64)
    syrk, gemm = both_kernels(lambda: kronfac.EKFAC(model, loss_fn, data, **extra).to_dense())
    assert_rel_close(syrk, gemm, 1e-10, f"EKFAC {case}")


@pytest.mark.parametrize("ekfac", [False, True])
@pytest.mark.parametrize("case", ["linear", "grouped-conv2d", "embedding"])
def test_running_factors_by_syrk_equal_the_gemm_fallback(case, ekfac):
    """The optimizer's factor steps read the symmetrised sums: its factors and its step."""
    model0, loss_fn, data, _ = CASES[case](torch.float64)

    def run():
        model = copy.deepcopy(model0)
        precond = KFACPreconditioner(
            model, loss_fn=loss_fn, factor_decay=0.5, damping=0.1, ekfac=ekfac, seed=3
        )
        for X, y in data * 2:
            model.zero_grad()
            loss_fn(model(X), y).backward()
            precond.step()
        grads = [p.grad.clone() for p in model.parameters()]
        return precond.factors(), grads

    (f_syrk, g_syrk), (f_gemm, g_gemm) = both_kernels(run)
    assert_same_factors(f_syrk, f_gemm, 1e-12, f"optimizer {case}")
    for a, b in zip(g_syrk, g_gemm, strict=True):
        assert_rel_close(a, b, 1e-9, f"optimizer step {case}")
