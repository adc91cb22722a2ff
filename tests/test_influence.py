"""``kronfac.Influence`` against dense float64 references built here with torch.func.

The reference of every score is the formula itself, in dense linear algebra:

    score(q, t) = g_qᵀ (H + diag(δ))⁻¹ g_t

with ``g_n`` the gradient of data point ``n``'s loss summed over its terms (``torch.func.vmap``
of ``grad`` of ``functional_call`` on one data point, a sum-reduced copy of the loss), ``H`` the
dense matrix of kronfac's own ``EKFAC`` / ``KFAC`` operator of the **summed** loss over the
curvature data (``.to_dense()``, the parameters of the selected modules), ``δ`` the damping of
each parameter's module, and ``torch.linalg.solve``. So these tests check the per-example
gradients (layouts, masks, ``ignore_index``, embeddings, grouped convolutions, sequences), the
scale (summed loss for a mean ``loss_fn``), the damping, the exact inverse in the eigenbasis
and the contractions — not how well K-FAC approximates the Hessian. Round-off tolerance:
relative ``1e-10`` (float64).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from helpers import (
    DT,
    assert_rel_close,
    gen,
    init,
    make_data,
    mlp,
    padded,
    padding_mask,
    randn,
    split_batches,
)
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import kronfac
from kronfac.influence.blocks import InverseBlock

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10
OPERATORS = {"ekfac": kronfac.EKFAC, "kfac": kronfac.KFAC}


# ----------------------------------------------------------------------------------------------
# models and data


class Tokens(nn.Module):
    """``Embedding(7, 4, padding_idx=0) → tanh → Linear(4, 3)`` at every token: ``[N, 3, T]``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.head = nn.Linear(4, 3)
        init(self, seed)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.head(torch.tanh(self.embed(input_ids))).transpose(1, 2)


def token_batches(sizes, T: int = 5, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Token sequences ``[B, T]`` (padding_idx 0 among them) and targets, some ignored (-100)."""
    g = gen(seed)
    out = []
    for B in sizes:
        X = torch.randint(0, 7, (B, T), generator=g)
        y = torch.randint(0, 3, (B, T), generator=g)
        y[torch.rand(B, T, generator=g, dtype=DT) < 0.3] = -100
        out.append((X, y))
    return out


def conv_net(seed: int = 0) -> nn.Module:
    """A grouped convolution (2 groups) on ``[B, 2, 5, 5]`` images, then a Linear head."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3))
    return init(net, seed)


def case(name: str, seed: int = 0):
    """``(model, loss_fn, data, train, queries)`` of a named case."""
    if name == "tokens":
        model, loss = Tokens(seed), nn.CrossEntropyLoss()
        return model, loss, *(token_batches(s, seed=seed + i) for i, s in enumerate(CASE_SIZES))
    if name == "conv":
        model, loss, shape = conv_net(seed), nn.CrossEntropyLoss(), (2, 5, 5)
    elif name == "mlp-mse":
        model, loss, shape = mlp((4, 5, 2), seed=seed), nn.MSELoss(), (4,)
    else:
        model, loss, shape = mlp((4, 5, 3), seed=seed), nn.CrossEntropyLoss(), (4,)
    kind = "mse" if isinstance(loss, nn.MSELoss) else "ce"
    return (
        model,
        loss,
        *(make_data(model, kind, s, shape, seed=seed + i) for i, s in enumerate(CASE_SIZES)),
    )


CASE_SIZES = ([5, 4], [3, 4], [2, 1])  # curvature data, train data, queries


# ----------------------------------------------------------------------------------------------
# the dense reference


def summed(loss_fn: nn.Module) -> nn.Module:
    out = copy.deepcopy(loss_fn)
    out.reduction = "sum"
    return out


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def per_example_grads(model, loss_fn, batches, names, measurement=None) -> Tensor:
    """``[n, P]``: each data point's gradient of its summed loss (or of ``measurement``)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    measure = summed(loss_fn) if measurement is None else measurement

    def loss(p, x, y):
        return measure(functional_call(model, {**params, **p}, (x[None],)), y[None])

    rows = []
    for X, y in batches:
        g = vmap(grad(loss), in_dims=(None, 0, 0))({n: params[n] for n in names}, X, y)
        rows.append(torch.cat([g[n].reshape(len(X), -1) for n in names], dim=1))
    return torch.cat(rows)


def dense_curvature(model, loss_fn, data, inf, curvature, fisher, **options) -> Tensor:
    """``H + diag(δ)``: kronfac's operator of the summed loss, dense, and the damping."""
    op = OPERATORS[curvature](model, summed(loss_fn), data, fisher=fisher, **options)
    assert op.param_names == inf.param_names
    params = dict(model.named_parameters())
    delta = torch.cat(
        [
            torch.full((params[n].numel(),), inf.damping[module_of(n)], dtype=DT)
            for n in inf.param_names
        ]
    )
    return op.to_dense() + torch.diag(delta)


def reference(model, loss_fn, data, train, queries, inf, curvature, fisher, **options):
    """Dense ``(pairwise [n_q, n_t], self [n_t])`` scores."""
    M = dense_curvature(model, loss_fn, data, inf, curvature, fisher, **options)
    Gt = per_example_grads(model, loss_fn, train, inf.param_names)
    Gq = per_example_grads(model, loss_fn, queries, inf.param_names)
    solved = torch.linalg.solve(M, Gt.T)  # [P, n_t]
    return Gq @ solved, (Gt.T * solved).sum(0)


# ----------------------------------------------------------------------------------------------
# scores against the dense reference


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
@pytest.mark.parametrize("name", ["mlp", "mlp-mse", "tokens", "conv"])
def test_scores_match_the_dense_reference(name, curvature, fisher):
    model, loss, data, train, queries = case(name)
    inf = kronfac.Influence(model, loss, data, curvature=curvature, fisher=fisher)
    pairwise, self_ = reference(model, loss, data, train, queries, inf, curvature, fisher)
    scores = inf.pairwise_scores(train, queries)
    assert scores.shape == (3, 7) and scores.dtype == DT
    assert_rel_close(scores, pairwise, TOL, "pairwise")
    assert_rel_close(inf.self_scores(train), self_, TOL, "self")
    # a mean loss: H is D times its operator, D the entries the mean averages over
    op = OPERATORS[curvature](model, loss, data, fisher=fisher)
    assert_rel_close(
        inf.hessian_scale * op.to_dense(),
        OPERATORS[curvature](model, summed(loss), data, fisher=fisher).to_dense(),
        TOL,
        "scale",
    )


def test_hessian_scale_counts_the_terms_of_the_summed_loss():
    model, loss, data, _, _ = case("tokens")
    inf = kronfac.Influence(model, loss, data, fisher="type-2")
    assert inf.hessian_scale == sum(int((y != -100).sum()) for _, y in data)  # N·R less ignored
    model, loss, data, _, _ = case("mlp-mse")
    inf = kronfac.Influence(model, loss, data, fisher="type-2")
    assert inf.hessian_scale == 9 * 2  # N·C
    inf = kronfac.Influence(model, summed(loss), data, fisher="type-2")
    assert inf.hessian_scale == 1


def test_curvature_comes_from_data_not_from_the_scored_data():
    model, loss, data, train, queries = case("mlp")
    other = make_data(model, "ce", [6, 3], (4,), seed=7)
    inf = kronfac.Influence(model, loss, data, damping=0.05, fisher="type-2")
    pairwise, self_ = reference(model, loss, data, train, queries, inf, "ekfac", "type-2")
    assert_rel_close(inf.pairwise_scores(train, queries), pairwise, TOL, "pairwise")
    assert_rel_close(inf.self_scores(train), self_, TOL, "self")
    from_other = kronfac.Influence(model, loss, other, damping=0.05, fisher="type-2")
    other_ref, _ = reference(model, loss, other, train, queries, from_other, "ekfac", "type-2")
    scores = from_other.pairwise_scores(train, queries)
    assert_rel_close(scores, other_ref, TOL, "H of other data")
    assert float((scores - pairwise).abs().max()) > 1e-3 * float(pairwise.abs().max())


# ----------------------------------------------------------------------------------------------
# damping


def check_heuristic_damping(inf, model, H) -> None:
    """Each ``δ_m`` is 0.1 x the mean eigenvalue of module m's block of the dense ``H``."""
    names = inf.param_names
    sizes = [dict(model.named_parameters())[n].numel() for n in names]
    owner = [module_of(n) for n, s in zip(names, sizes, strict=True) for _ in range(s)]
    assert set(inf.damping) == set(inf.modules)
    for module, delta in inf.damping.items():
        idx = torch.tensor([i for i, m in enumerate(owner) if m == module])
        block = H[idx][:, idx]
        expected = 0.1 * float(torch.linalg.eigvalsh(block).mean())
        assert abs(delta - expected) <= 1e-10 * expected, (module, delta, expected)


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_default_damping_is_a_tenth_of_each_blocks_mean_eigenvalue(curvature):
    model, loss, data, _, _ = case("tokens")
    inf = kronfac.Influence(model, loss, data, curvature=curvature, fisher="type-2")
    H = OPERATORS[curvature](model, summed(loss), data, fisher="type-2").to_dense()
    assert set(inf.damping) == {"embed", "head"}
    check_heuristic_damping(inf, model, H)


def test_absolute_damping_and_zero_damping():
    model, loss, data, train, queries = case("mlp")
    inf = kronfac.Influence(model, loss, data, damping=0.3, fisher="empirical")
    assert inf.damping == {"0": 0.3, "2": 0.3}
    pairwise, _ = reference(model, loss, data, train, queries, inf, "ekfac", "empirical")
    assert_rel_close(inf.pairwise_scores(train, queries), pairwise, TOL)
    big = make_data(model, "ce", [40], (4,), seed=3)  # enough data for a non-singular H
    inf = kronfac.Influence(model, loss, big, damping=0, curvature="kfac", fisher="type-2")
    pairwise, _ = reference(model, loss, big, train, queries, inf, "kfac", "type-2")
    assert_rel_close(inf.pairwise_scores(train, queries), pairwise, 1e-8)


# ----------------------------------------------------------------------------------------------
# modules


def test_module_subsets_and_per_module_scores_add_up():
    model, loss, data, train, queries = case("tokens")
    inf = kronfac.Influence(model, loss, data, fisher="type-2")
    total = inf.pairwise_scores(train, queries)
    parts = inf.pairwise_scores(train, queries, per_module=True)
    assert list(parts) == ["embed", "head"]
    assert_rel_close(sum(parts.values()), total, TOL, "per module")
    self_parts = inf.self_scores(train, per_module=True)
    assert_rel_close(sum(self_parts.values()), inf.self_scores(train), TOL, "self per module")
    for module in ("embed", "head"):
        alone = kronfac.Influence(model, loss, data, fisher="type-2", modules=[module])
        assert alone.param_names == [n for n in inf.param_names if module_of(n) == module]
        assert alone.damping == {module: inf.damping[module]}
        pairwise, self_ = reference(
            model, loss, data, train, queries, alone, "ekfac", "type-2", modules=[module]
        )
        assert_rel_close(alone.pairwise_scores(train, queries), pairwise, TOL, module)
        assert_rel_close(parts[module], pairwise, TOL, f"{module} of all")
        assert_rel_close(alone.self_scores(train), self_, TOL, f"self {module}")
        assert_rel_close(self_parts[module], self_, TOL, f"self {module} of all")


# ----------------------------------------------------------------------------------------------
# data handling


def test_batch_sizes_and_order_do_not_matter():
    model, loss, data, _, _ = case("mlp")
    X = randn(9, 4, g=gen(5))
    y = torch.randint(0, 3, (9,), generator=gen(6))
    inf = kronfac.Influence(model, loss, data, fisher="type-2")
    queries = split_batches(X[:4], y[:4], [4])
    scores = inf.pairwise_scores(split_batches(X, y, [4, 5]), queries)
    self_ = inf.self_scores(split_batches(X, y, [4, 5]))
    perm = torch.randperm(9, generator=gen(8))
    shuffled = split_batches(X[perm], y[perm], [1, 6, 2])
    assert_rel_close(inf.pairwise_scores(shuffled, queries), scores[:, perm], TOL)
    assert_rel_close(inf.self_scores(shuffled), self_[perm], TOL)
    requeried = split_batches(X[:4].flip(0), y[:4].flip(0), [1, 3])
    assert_rel_close(inf.pairwise_scores(shuffled, requeried), scores[:, perm].flip(0), TOL)
    # the curvature data in other batches: the same H (type-2 is deterministic)
    Xd = torch.cat([b[0] for b in data])
    yd = torch.cat([b[1] for b in data])
    rebatched = kronfac.Influence(model, loss, split_batches(Xd, yd, [2, 2, 5]), fisher="type-2")
    assert_rel_close(rebatched.pairwise_scores(split_batches(X, y, [9]), queries), scores, TOL)


def test_memory_budget_chunks_give_the_same_scores():
    model, loss, data, train, queries = case("tokens")
    inf = kronfac.Influence(model, loss, data, fisher="type-2")
    scores, self_ = inf.pairwise_scores(train, queries), inf.self_scores(train)
    low = inf.pairwise_scores(train, queries, query_rank=2)
    inf.memory_budget = 1  # one data point per chunk
    assert_rel_close(inf.pairwise_scores(train, queries), scores, TOL)
    assert_rel_close(inf.self_scores(train), self_, TOL)
    assert_rel_close(inf.pairwise_scores(train, queries, query_rank=2), low, TOL)


def test_padding_is_masked_as_in_the_curvature():
    """Padded sequences with an attention_mask score as the unpadded sequences one by one."""
    model, loss = Tokens(), nn.CrossEntropyLoss()
    lengths, T = [3, 5, 2, 4], 5
    g = gen(11)
    ids = [torch.randint(1, 7, (L,), generator=g) for L in lengths]
    ys = [torch.randint(0, 3, (L,), generator=g) for L in lengths]
    ys[1][2] = -100
    mask = padding_mask(lengths, T)
    X, Y = padded(ids, T, 0).long(), padded(ys, T, 1).long()  # pads: real classes, masked
    padded_batches = [({"input_ids": X[:2], "attention_mask": mask[:2]}, Y[:2])]
    padded_batches.append(({"input_ids": X[2:], "attention_mask": mask[2:]}, Y[2:]))
    single = [({"input_ids": i[None]}, y[None]) for i, y in zip(ids, ys, strict=True)]
    forward = lambda model, X: model(**X)  # noqa: E731
    a = kronfac.Influence(model, loss, padded_batches, fisher="type-2", forward=forward)
    b = kronfac.Influence(model, loss, single, fisher="type-2", forward=forward)
    assert a.hessian_scale == b.hessian_scale == sum(lengths) - 1
    assert_rel_close(a.damping["head"], b.damping["head"], TOL)
    assert_rel_close(
        a.pairwise_scores(padded_batches, single[:2]), b.pairwise_scores(single, single[:2]), TOL
    )
    assert_rel_close(a.self_scores(padded_batches), b.self_scores(single), TOL)
    # the unpadded sequences against the dense reference, one at a time
    M = dense_curvature(
        model,
        loss,
        [(i[None], y[None]) for i, y in zip(ids, ys, strict=True)],
        b,
        "ekfac",
        "type-2",
    )
    G = torch.cat(
        [
            per_example_grads(model, loss, [(i[None], y[None])], b.param_names)
            for i, y in zip(ids, ys, strict=True)
        ]
    )
    assert_rel_close(b.self_scores(single), (G.T * torch.linalg.solve(M, G.T)).sum(0), TOL)


def test_query_loss_fn_is_the_measurement():
    model, loss, data, train, queries = case("mlp")
    inf = kronfac.Influence(model, loss, data, fisher="type-2")

    def margin(output, y):  # the correct class's logit, summed over the batch
        return output.gather(1, y[:, None]).sum()

    M = dense_curvature(model, loss, data, inf, "ekfac", "type-2")
    Gt = per_example_grads(model, loss, train, inf.param_names)
    Gq = per_example_grads(model, loss, queries, inf.param_names, measurement=margin)
    expected = Gq @ torch.linalg.solve(M, Gt.T)
    assert_rel_close(inf.pairwise_scores(train, queries, query_loss_fn=margin), expected, TOL)
    as_module = inf.pairwise_scores(
        train, queries, query_loss_fn=nn.CrossEntropyLoss(reduction="sum")
    )
    assert_rel_close(as_module, inf.pairwise_scores(train, queries), TOL)


def test_query_loss_fn_on_padded_sequences_counts_the_real_tokens():
    """The covered modules' rows are masked at padding, whatever the measurement."""
    model, loss, data, train, _ = case("tokens")
    inf = kronfac.Influence(model, loss, data, fisher="type-2")
    ids = torch.tensor([[3, 4, 5, 0], [2, 6, 0, 0]])
    y = torch.tensor([[1, 2, 0, 2], [0, 1, 1, 2]])  # real classes at the padding
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    padded_queries = [({"input_ids": ids, "attention_mask": mask}, y)]
    single = [({"input_ids": ids[:1, :3]}, y[:1, :3]), ({"input_ids": ids[1:, :2]}, y[1:, :2])]
    measured = inf.pairwise_scores(
        train, padded_queries, query_loss_fn=nn.CrossEntropyLoss(reduction="sum")
    )
    assert_rel_close(measured, inf.pairwise_scores(train, single), TOL)
    assert_rel_close(inf.pairwise_scores(train, padded_queries), measured, TOL)


def test_a_language_model_with_padding_scores_as_its_unpadded_sequences():
    """A transformers causal LM (Mapping batches, ``forward=``, right padding, its embedding)."""
    pytest.importorskip("transformers")
    from helpers import lm_logits, tiny_llama

    model = tiny_llama(20)
    g = gen(0)
    ids = torch.randint(0, 20, (4, 7), generator=g)
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 4:] = 0
    batch = ({"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]}, ids[:, 1:])
    lengths = mask[:, :-1].sum(1).tolist()
    single = [
        ({"input_ids": ids[i : i + 1, :L]}, ids[i : i + 1, 1 : L + 1])
        for i, L in enumerate(lengths)
    ]
    options = {"forward": lm_logits, "modules": ["embed", "layers.1.mlp"], "fisher": "type-2"}
    padded_inf = kronfac.Influence(model, nn.CrossEntropyLoss(), [batch], **options)
    single_inf = kronfac.Influence(model, nn.CrossEntropyLoss(), single, **options)
    assert padded_inf.modules[0] == "model.embed_tokens" and len(padded_inf.modules) == 4
    scores = padded_inf.pairwise_scores([batch], [batch])
    assert_rel_close(scores, single_inf.pairwise_scores(single, single), 1e-9)
    assert_rel_close(padded_inf.self_scores([batch]), scores.diagonal(), 1e-9)
    assert_rel_close(single_inf.self_scores(single), scores.diagonal(), 1e-9)


# ----------------------------------------------------------------------------------------------
# low-rank queries


def truncated(P: Tensor, model: nn.Module, names, rank: int) -> Tensor:
    """The flat vector ``P [P]`` with each module's ``[d_out, d_in (+1)]`` matrix truncated."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    pieces, start = {}, 0
    for n in names:
        pieces[n] = P[start : start + params[n].numel()].reshape(params[n].shape)
        start += params[n].numel()
    out = []
    for m in dict.fromkeys(module_of(n) for n in names):
        weight = pieces[f"{m}.weight"]
        if isinstance(modules[m], nn.Embedding):
            matrix = weight.T
        else:
            matrix = weight.reshape(weight.shape[0], -1)
            if f"{m}.bias" in pieces:
                matrix = torch.cat([matrix, pieces[f"{m}.bias"][:, None]], dim=1)
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        low = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        if isinstance(modules[m], nn.Embedding):
            out.append(low.T.reshape(-1))
            continue
        d = weight[0].numel()
        out.append(low[:, :d].reshape(-1))
        if f"{m}.bias" in pieces:
            out.append(low[:, d])
    return torch.cat(out)


@pytest.mark.parametrize("route", ["cheaper", "rows", "gradients"])
@pytest.mark.parametrize("name", ["mlp", "tokens", "conv"])
def test_low_rank_queries_are_the_truncated_svd(name, route, monkeypatch):
    """Scored from the layer rows or from the formed gradients: the same truncated SVD."""
    if route != "cheaper":
        monkeypatch.setattr(InverseBlock, "_rows_route", lambda self, q, T: route == "rows")
    model, loss, data, train, queries = case(name)
    inf = kronfac.Influence(model, loss, data, fisher="type-2")
    M = dense_curvature(model, loss, data, inf, "ekfac", "type-2")
    Gt = per_example_grads(model, loss, train, inf.param_names)
    Gq = per_example_grads(model, loss, queries, inf.param_names)
    P = torch.linalg.solve(M, Gq.T).T  # [n_q, P]: the preconditioned queries
    exact = P @ Gt.T
    errors = []
    for rank in (1, 2, 3):
        Pr = torch.stack([truncated(p, model, inf.param_names, rank) for p in P])
        got = inf.pairwise_scores(train, queries, query_rank=rank)
        assert_rel_close(got, Pr @ Gt.T, TOL, f"rank {rank}")
        errors.append(float((got - exact).abs().max()))
    full = inf.pairwise_scores(train, queries, query_rank=100)
    assert_rel_close(full, exact, TOL, "full rank")
    assert errors[0] > errors[-1] > 0


def test_low_rank_scores_converge_as_the_rank_grows():
    model = mlp((6, 8, 8, 4), seed=2)
    data = make_data(model, "ce", [20], (6,), seed=3)
    train = make_data(model, "ce", [10], (6,), seed=4)
    queries = make_data(model, "ce", [4], (6,), seed=5)
    inf = kronfac.Influence(model, nn.CrossEntropyLoss(), data, fisher="type-2")
    exact = inf.pairwise_scores(train, queries)
    errors = [
        float((inf.pairwise_scores(train, queries, query_rank=r) - exact).abs().max())
        for r in (1, 2, 4, 6, 8)
    ]
    assert errors[0] > errors[2] > errors[3] > errors[4]
    assert errors[-1] <= TOL * float(exact.abs().max())


# ----------------------------------------------------------------------------------------------
# low-rank factors and separate bias blocks

#: ``(model, loss, data, train, queries)`` and the options that make some factors low-rank: per
#: case, sides at least ``rank_threshold`` long are rank ``rank``, the others dense.
LOW_RANK = {
    # Linear(4, 8): A 5 dense, S 8 low; Linear(8, 7): both low; Linear(7, 3): A 8 low, S 3 dense
    "mlp": {"rank": 3, "rank_threshold": 6},
    # the embedding's S 4 low (its A is diagonal), the head's A 5 low and S 3 dense; T = 5
    "tokens": {"rank": 2, "rank_threshold": 4},
    # the grouped convolution's A 10 per group low, S 2 dense; the head's A 37 low, S 3 dense
    "conv": {"rank": 3, "rank_threshold": 5},
}


def low_rank_case(name: str):
    if name == "mlp":
        model, loss = mlp((4, 8, 7, 3), seed=0), nn.CrossEntropyLoss()
        batches = [make_data(model, "ce", s, (4,), seed=i) for i, s in enumerate(CASE_SIZES)]
        return model, loss, *batches
    return case(name)


def partial_sides(inf) -> set[tuple[str, str]]:
    """``(module, side)`` of the blocks' partial bases."""
    out = set()
    for b in inf._blocks:
        for side, Q in (("S", b.Q_S), ("A", b.Q_A)):
            if Q is not None and Q.shape[-1] < Q.shape[-2]:
                out.add((b.module, side))
    return out


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
@pytest.mark.parametrize("name", ["mlp", "tokens", "conv"])
def test_low_rank_factors_match_the_dense_reference(name, curvature, monkeypatch):
    """Partial bases with the complement's eigenvalue: ``(H + δI)⁻¹`` exact for this ``H``.

    The self-scores' ``‖G_n‖²`` from the rows' Grams or from the formed gradients alike.
    """
    model, loss, data, train, queries = low_rank_case(name)
    options = LOW_RANK[name]
    inf = kronfac.Influence(
        model, loss, data, curvature=curvature, fisher="type-2", damping=0.05, **options
    )
    expected = {
        "mlp": {("0", "S"), ("2", "S"), ("2", "A"), ("4", "A")},
        "tokens": {("embed", "S"), ("head", "A")},
        "conv": {("0", "A"), ("3", "A")},
    }[name]
    assert partial_sides(inf) == expected
    assert all(b.rest > 0 for b in inf._blocks)
    if curvature == "ekfac":  # the complement's eigenvalue: the mean second moment outside
        assert all(b.complement > 0 for b in inf._blocks)
    else:
        assert all(b.complement == 0 for b in inf._blocks)
    pairwise, self_ = reference(
        model, loss, data, train, queries, inf, curvature, "type-2", **options
    )
    assert_rel_close(inf.pairwise_scores(train, queries), pairwise, TOL, "pairwise")
    assert_rel_close(inf.self_scores(train), self_, TOL, "self")
    for gram in (True, False):
        with monkeypatch.context() as m:
            m.setattr(InverseBlock, "_gram_route", lambda self, T, gram=gram: gram)
            assert_rel_close(inf.self_scores(train), self_, TOL, f"self, gram={gram}")
    full = inf.pairwise_scores(train, queries, query_rank=100)
    assert_rel_close(full, pairwise, TOL, "full-rank queries")
    inf.memory_budget = 1  # one data point per chunk
    assert_rel_close(inf.pairwise_scores(train, queries), pairwise, TOL, "chunked")
    assert_rel_close(inf.self_scores(train), self_, TOL, "self chunked")


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
@pytest.mark.parametrize("name", ["mlp", "tokens"])
def test_default_damping_with_low_rank_factors_counts_the_complement(name, curvature):
    model, loss, data, train, queries = low_rank_case(name)
    options = LOW_RANK[name]
    inf = kronfac.Influence(model, loss, data, curvature=curvature, fisher="type-2", **options)
    H = OPERATORS[curvature](model, summed(loss), data, fisher="type-2", **options).to_dense()
    check_heuristic_damping(inf, model, H)
    pairwise, self_ = reference(
        model, loss, data, train, queries, inf, curvature, "type-2", **options
    )
    assert_rel_close(inf.pairwise_scores(train, queries), pairwise, TOL, "pairwise")
    assert_rel_close(inf.self_scores(train), self_, TOL, "self")


@pytest.mark.parametrize("rank", [None, 1])
@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
@pytest.mark.parametrize("name", ["mlp", "tokens", "conv"])
def test_separate_bias_matches_the_dense_reference(name, curvature, rank):
    """A bias block of its own (``S`` alone, ``a = 1``), per-module results by module.

    ``rank=1``: every side from 2 on low-rank, the bias block's ``S`` too (EKFAC: its own
    complement eigenvalue); default damping.
    """
    model, loss, data, train, queries = case(name)
    options = {"bias": "separate"}
    if rank is not None:
        options |= {"rank": rank, "rank_threshold": 2}
    inf = kronfac.Influence(model, loss, data, curvature=curvature, fisher="type-2", **options)
    bias_blocks = [b for b in inf._blocks if b.bias_only]
    assert len(bias_blocks) == (1 if name == "tokens" else 2)
    assert all(b.q == 1 and b.Q_A is None for b in bias_blocks)
    if rank is not None:
        assert all(b.rest > 0 for b in bias_blocks)
        if curvature == "ekfac":
            assert all(b.complement > 0 for b in bias_blocks)
    H = OPERATORS[curvature](model, summed(loss), data, fisher="type-2", **options).to_dense()
    check_heuristic_damping(inf, model, H)
    M = dense_curvature(model, loss, data, inf, curvature, "type-2", **options)
    Gt = per_example_grads(model, loss, train, inf.param_names)
    Gq = per_example_grads(model, loss, queries, inf.param_names)
    solved = torch.linalg.solve(M, Gt.T)
    assert_rel_close(inf.pairwise_scores(train, queries), Gq @ solved, TOL, "pairwise")
    assert_rel_close(inf.self_scores(train), (Gt.T * solved).sum(0), TOL, "self")
    # per module: the weight's and the bias's blocks together, H block-diagonal over modules
    parts = inf.pairwise_scores(train, queries, per_module=True)
    self_parts = inf.self_scores(train, per_module=True)
    assert list(parts) == list(self_parts) == inf.modules
    params = dict(model.named_parameters())
    owner = [module_of(n) for n in inf.param_names for _ in range(params[n].numel())]
    for module in inf.modules:
        idx = torch.tensor([i for i, m in enumerate(owner) if m == module])
        solved = torch.linalg.solve(M[idx][:, idx], Gt[:, idx].T)
        assert_rel_close(parts[module], Gq[:, idx] @ solved, TOL, module)
        assert_rel_close(self_parts[module], (Gt[:, idx].T * solved).sum(0), TOL, module)


# ----------------------------------------------------------------------------------------------
# MC, the model's state


def test_mc_fisher_is_reproducible():
    model, loss, data, train, queries = case("mlp")
    a = kronfac.Influence(model, loss, data).pairwise_scores(train, queries)  # mc, ekfac
    b = kronfac.Influence(model, loss, data).pairwise_scores(train, queries)
    assert a.shape == (3, 7) and bool(torch.isfinite(a).all())
    assert torch.equal(a, b)


def test_the_model_is_left_as_it_was():
    model = nn.Sequential(mlp((4, 5, 5), seed=0), nn.Tanh(), mlp((5, 3), seed=1))
    for p in model[0][0].parameters():  # a frozen first layer: not covered
        p.requires_grad_(False)
    model.train()
    model[2].eval()
    loss = nn.CrossEntropyLoss()
    data = make_data(model, "ce", [5, 4], (4,), seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    inf = kronfac.Influence(model, loss, data, fisher="type-2")
    assert inf.modules == ["0.2", "2.0"]
    inf.pairwise_scores(data, data[:1], query_rank=1)
    inf.self_scores(data, per_module=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), m
        assert not m._forward_hooks_with_kwargs and not m._forward_pre_hooks_with_kwargs, m


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"curvature": "hessian"}, ValueError, "Unknown curvature 'hessian'; expected"),
        ({"fisher": "forward-only"}, ValueError, "Unknown fisher 'forward-only'; expected"),
        ({"damping": -1.0}, ValueError, "damping must be non-negative and finite, got -1.0"),
        ({"damping": float("nan")}, ValueError, "damping must be non-negative and finite"),
        (
            {"damping": "0.1"},
            TypeError,
            "damping must be None .* or a non-negative number, got str",
        ),
        ({"damping": True}, TypeError, "non-negative number, got bool"),
        ({"modules": ["nothing"]}, ValueError, "nothing"),
        ({"memory_budget": 0}, ValueError, "memory_budget must be a positive integer"),
        ({"memory_budget": 1.5}, TypeError, "memory_budget must be a positive integer"),
        ({"rank": 0}, ValueError, "rank must be a positive integer or None, got 0"),
        ({"rank_threshold": 0}, ValueError, "rank_threshold must be a positive integer, got 0"),
        ({"bias": "none"}, ValueError, "Invalid bias 'none'. Supported: joint, separate"),
    ],
)
def test_bad_options(kwargs, error, match):
    model, loss, data, _, _ = case("mlp")
    with pytest.raises(error, match=match):
        kronfac.Influence(model, loss, data, **kwargs)


def test_bad_data_and_calls():
    model, loss, data, train, queries = case("mlp")
    with pytest.raises(ValueError, match="data is empty"):
        kronfac.Influence(model, loss, [])
    with pytest.raises(TypeError, match="one-shot iterator"):
        kronfac.Influence(model, loss, iter(data))
    inf = kronfac.Influence(model, loss, data, fisher="type-2")
    X, y = queries[0]
    bad_queries = {
        "expected targets of shape": [(X, y[:1])],  # wrong length
        "integer dtype": [(X, y.double())],  # wrong dtype
        r"class indices in \[0, 3\)": [(X, y + 3)],  # out of range
    }
    for match, batches in bad_queries.items():
        with pytest.raises((ValueError, TypeError), match=match):
            inf.pairwise_scores(train, batches)
    with pytest.raises(ValueError, match="query_data is empty"):
        inf.pairwise_scores(train, [])
    with pytest.raises(ValueError, match="train_data is empty"):
        inf.pairwise_scores([], queries)
    with pytest.raises(ValueError, match="train_data is empty"):
        inf.self_scores([])
    with pytest.raises(ValueError, match="expected a pair"):
        inf.self_scores([X])
    with pytest.raises(ValueError, match="query_rank must be a positive integer"):
        inf.pairwise_scores(train, queries, query_rank=0)
    with pytest.raises(TypeError, match="query_rank must be a positive integer"):
        inf.pairwise_scores(train, queries, query_rank=2.0)
    with pytest.raises(ValueError, match=r"reduction='mean'.*reduction='sum'"):
        inf.pairwise_scores(train, queries, query_loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="query_loss_fn must be a callable"):
        inf.pairwise_scores(train, queries, query_loss_fn="loss")
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        inf.pairwise_scores(train, queries, query_loss_fn=lambda out, y: out.sum(1))
    with pytest.raises(TypeError, match="per_module must be a bool"):
        inf.self_scores(train, per_module="yes")


def test_unsupported_losses_are_refused():
    model, _, data, _, _ = case("mlp")
    with pytest.raises(NotImplementedError, match="label_smoothing"):
        kronfac.Influence(model, nn.CrossEntropyLoss(label_smoothing=0.1), data)


# ----------------------------------------------------------------------------------------------
# the documentation's example


def test_docs_example_runs_as_written():
    text = (Path(__file__).resolve().parents[1] / "docs" / "influence.md").read_text("utf-8")
    (block,) = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    namespace: dict = {}
    exec(block, namespace)
    scores, self_influence = namespace["scores"], namespace["self_influence"]
    assert scores.shape == (4, 64) and self_influence.shape == (64,)
    assert bool((self_influence > 0).all())


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_float32_scores_match_float64(curvature):
    """Small exact eigenvalues survive in float32 (a tolerance of ``p·q`` entries' round-off
    zeroed everything below ~0.5% of the largest: scores off by ~40%)."""
    torch.manual_seed(0)
    X = torch.randn(256, 64) * torch.logspace(0, -2, 64)  # an input spectrum over 4 decades
    y = torch.randint(0, 10, (256,))
    model = nn.Sequential(nn.Linear(64, 65), nn.Tanh(), nn.Linear(65, 10))
    scores = {}
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(model).to(dtype)
        data = [(X[i : i + 64].to(dtype), y[i : i + 64]) for i in range(0, 256, 64)]
        inf = kronfac.Influence(
            m, nn.CrossEntropyLoss(), data, curvature=curvature, fisher="type-2"
        )
        scores[dtype] = (inf.pairwise_scores(data, data[:1]), inf.self_scores(data))
    for f32, f64 in zip(scores[torch.float32], scores[torch.float64], strict=True):
        assert_rel_close(f32.double(), f64, 2e-3, f"{curvature} float32")
