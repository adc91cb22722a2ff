"""nn.Embedding: a diagonal input factor (token frequencies), exact where K-FAC is exact."""

import pytest
import torch
from helpers import DT, gen, pi_damping, randn, split_batches
from reference import ggn
from torch import nn

import kronfac

V, D, C = 7, 4, 3


class PerToken(nn.Module):
    """Embedding then a Linear at every position: each position's path is independent."""

    def __init__(self, padding_idx=None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx).to(DT)
        self.out = nn.Linear(D, C).to(DT)

    def forward(self, idx):
        return self.out(self.emb(idx))  # [N, T, C]


def data(n=4, T=5, seed=0):
    g = gen(seed)
    idx = torch.randint(0, V, (n, T), generator=g)
    y = randn(n, T, C, g=g)
    return split_batches(idx, y, (1, n - 1))


def test_input_factor_is_the_token_frequencies_as_a_vector():
    model = PerToken(padding_idx=2)
    batches = data()
    f = kronfac.compute_factors(model, nn.MSELoss(), batches, fisher="type-2")
    A = f["emb"].A
    assert A.shape == (V,)  # a diagonal, never V x V
    idx = torch.cat([x for x, _ in batches])
    expected = torch.bincount(idx.reshape(-1), minlength=V).to(DT) / idx.numel()
    expected[2] = 0  # padding_idx gets no gradient
    torch.testing.assert_close(A, expected)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_embedding_block_is_exact_for_one_datum_per_position_paths(reduction):
    """Independent per-position linear paths + MSE: K-FAC-expand is exact (one datum, T = 5)."""
    model = PerToken()
    loss = nn.MSELoss(reduction=reduction)
    one = data(n=1)[:1]
    K = kronfac.KFAC(model, loss, one, fisher="type-2", modules=["emb"])
    G = ggn(model, loss, one, param_names=["emb.weight"])
    torch.testing.assert_close(K.to_dense(), G, rtol=1e-10, atol=1e-12)


def test_embedding_with_cross_entropy_one_token_is_exact():
    model = PerToken()
    idx = torch.tensor([[3]])
    y = torch.tensor([[1]])
    forward = lambda m, X: m(X).transpose(1, 2)  # noqa: E731
    one = [(idx, y)]
    K = kronfac.KFAC(model, nn.CrossEntropyLoss(), one, fisher="type-2", forward=forward)
    G = ggn(model, nn.CrossEntropyLoss(), one, forward=forward)
    P_emb = V * D
    blocks = torch.zeros_like(G)
    blocks[:P_emb, :P_emb] = G[:P_emb, :P_emb]
    blocks[P_emb:, P_emb:] = G[P_emb:, P_emb:]
    torch.testing.assert_close(K.to_dense(), blocks, rtol=1e-10, atol=1e-12)


def dense_embedding_block(S, a):
    """The block in the parameter's own layout (row-major [V, D]) from W = Eᵀ's S ⊗ diag(a)."""
    M = torch.kron(S, torch.diag(a))  # acts on row-major [D, V]
    perm = torch.arange(D * V).reshape(D, V).T.reshape(-1)  # [V, D] index -> [D, V] index
    return M[perm][:, perm]


def reference(mode, S, A, delta=1e-2):
    """The dense operator of each mode, built here from S and diag(A)."""
    eyeS, eye = torch.eye(D, dtype=DT), torch.eye(V * D, dtype=DT)
    if mode == "K":
        return dense_embedding_block(S, A)
    if mode == "inverse":
        return torch.linalg.inv(dense_embedding_block(S + delta * eyeS, A + delta))
    if mode == "heuristic":  # π from the mean eigenvalues: A + π√δ, S + √δ/π
        d_S, d_A = pi_damping(S, torch.diag(A), delta)
        return torch.linalg.inv(dense_embedding_block(S + d_S * eyeS, A + d_A))
    return torch.linalg.inv(dense_embedding_block(S, A) + delta * eye)  # exact


@pytest.mark.parametrize("mode", ["K", "inverse", "heuristic", "exact"])
def test_operator_with_diagonal_factor_matches_dense(mode):
    model = PerToken(padding_idx=0)
    K = kronfac.KFAC(model, nn.MSELoss(), data(), fisher="type-2", modules=["emb"])
    A, S = K.factors["emb"]
    op = {
        "K": lambda: K,
        "inverse": lambda: K.inverse(1e-2),
        "heuristic": lambda: K.inverse(1e-2, heuristic=True),
        "exact": lambda: K.inverse(1e-2, exact=True),
    }[mode]()
    ref = reference(mode, S, A)
    eye = torch.eye(V * D, dtype=DT)
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(op.trace(), ref.trace())
    torch.testing.assert_close(op.diagonal(), ref.diagonal())
    torch.testing.assert_close(op.frobenius_norm(), ref.norm())
    torch.testing.assert_close(op.logdet(0.5), torch.logdet(ref + 0.5 * eye))
    v = torch.randn(V * D, dtype=DT)
    torch.testing.assert_close(op @ v, ref @ v)


def test_singular_diagonal_factor_logdet_is_minus_inf_and_default_inverse_needs_damping():
    model = PerToken(padding_idx=0)  # token 0's count is zero: A is singular
    K = kronfac.KFAC(model, nn.MSELoss(), data(), fisher="type-2", modules=["emb"])
    assert K.logdet() == -torch.inf
    with pytest.raises(kronfac.NotPSDError, match="emb"):
        K.inverse(0.0)


def test_ekfac_eigenvalues_of_embedding_equal_per_example_formula():
    model = PerToken(padding_idx=1)
    batches = data(n=3, T=6)
    E = kronfac.EKFAC(
        model, nn.MSELoss(reduction="sum"), batches, fisher="empirical", modules=["emb"]
    )
    Q_A, Q_S, lam, _ = E.factors.corrections["emb"][:4]
    assert Q_A is None
    # per-example gradient of the summed loss w.r.t. W = Eᵀ [D, V], densely with one-hot inputs
    expected = torch.zeros(D, V, dtype=DT)
    for X, y in batches:
        for n in range(len(X)):
            model.zero_grad()
            nn.MSELoss(reduction="sum")(model(X[n : n + 1]), y[n : n + 1]).backward()
            G = model.emb.weight.grad.T  # [D, V]
            expected += (Q_S.T @ G).square()
    torch.testing.assert_close(lam, expected, rtol=1e-10, atol=1e-12)
    assert torch.all(lam[:, 1] == 0)


def test_reduce_and_unsupported_options_raise():
    with pytest.raises(NotImplementedError, match=r"reduce.*emb"):
        kronfac.compute_factors(PerToken(), nn.MSELoss(), data(), approx="reduce")
    model = PerToken()
    model.emb.max_norm = 1.0
    with pytest.raises(NotImplementedError, match="max_norm"):
        kronfac.compute_factors(model, nn.MSELoss(), data(), modules=["emb"])


def test_weight_shared_by_embedding_and_linear_warns_naming_both():
    """A tied input embedding / output layer (GPT-2) has no single Kronecker block."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D).to(DT)
            self.head = nn.Linear(D, V, bias=False).to(DT)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.emb(idx)).transpose(1, 2)

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, V, (3, 4), generator=g)
    batches = [(idx, idx)]
    with pytest.warns(
        UserWarning, match=r"'emb' \(Embedding\) and 'head' \(Linear\) share a weight"
    ):
        f = kronfac.compute_factors(Tied(), nn.CrossEntropyLoss(), batches)
    assert list(f) == ["emb"]
    with pytest.warns(UserWarning, match=r"'head' \(Linear\) and 'emb' \(Embedding\).*left out"):
        f = kronfac.compute_factors(Tied(), nn.CrossEntropyLoss(), batches, modules=["head"])
    assert list(f) == ["head"] and f.param_names["head"].weight == "emb.weight"
    K = kronfac.KFAC.from_factors(f, Tied())
    assert K.param_names == ["emb.weight"]


def test_ekfac_with_low_rank_output_factor():
    """S of the embedding low-rank (partial basis): the trace is the total second moment."""
    model = PerToken(padding_idx=1)
    loss, batches = nn.MSELoss(), data()
    kw = {"fisher": "empirical", "modules": ["emb"]}
    full = kronfac.EKFAC(model, loss, batches, **kw)
    low = kronfac.EKFAC(model, loss, batches, rank=2, rank_threshold=D, **kw)
    assert isinstance(low.factors["emb"].S, kronfac.LowRankFactor)
    torch.testing.assert_close(low.trace(), full.trace(), rtol=1e-10, atol=0)
    exact = kronfac.EKFAC(model, loss, batches, rank=D, rank_threshold=D, **kw)  # complete basis
    torch.testing.assert_close(exact.to_dense(), full.to_dense(), rtol=1e-10, atol=1e-14)
