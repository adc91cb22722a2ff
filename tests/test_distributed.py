"""torch.distributed (gloo, CPU): every rank's ``data`` is its shard of one data set.

With the default process group initialised (or ``process_group=`` given), ``compute_factors``,
``KFAC``, ``EKFAC``, ``Laplace`` and ``Influence`` all-reduce the factor sums, the counts and
EKFAC's corrections: every rank gets what one process gets on the union of the shards.

One spawn per world size (2 and 3) runs every case of :data:`CASES`, so that the start-up of
the processes (importing torch and kronfac) is paid once. Each case runs on a default group of
its own (:func:`each_on_a_group`), so that a rank that skips a collective or hangs in one spoils
that case only; each rank writes its results after every case, and a spawn that outlives
:data:`RUN_TIMEOUT` is killed (its tests fail naming the case it hung in). This process, which
has no process group, computes the single-process reference on the union of the shards and
compares, one test per world size and case:

- ``union`` cases: every rank equals the union's result (float64, rel :data:`helpers.TOL`):
  both Fisher types, both bias modes, MSE (sum, mean) and cross-entropy (mean), shards of
  unequal sizes and batch sizes, padded sequences with attention masks (and ``ignore_index``),
  low-rank factors (exact, and truncated against the single-process sketch), EKFAC, operator
  products, ``inverse``, ``logdet``, ``Laplace``, ``Influence`` (its curvature; scores of the
  same batches on every rank), a shard whose every loss term is ignored, ``num_data=`` given
  as the union's;
- ``agree`` (``fisher="mc"``): the ranks agree with each other, with the union's keys, shapes
  and counts, finite and symmetric; and rank ``r`` samples with ``seed + r`` (the union's
  factors are the shards' single-process factors at those seeds, weighted by their sizes);
- ``pair`` (an explicit ``process_group`` of ranks 0 and 1; rank 2 sits out): ranks 0 and 1
  equal the union of their two shards.

A separate spawn of 2 ranks checks the failure path (:func:`_failing_calls`): rank 1's call
raises before the collectives (empty data, bad inputs, a one-shot iterator); rank 1 raises its
own error, rank 0 a ``RuntimeError`` naming the failure, neither waits in a collective, and the
group works afterwards.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import (
    TOL,
    assert_rel_close,
    gen,
    init,
    make_data,
    make_loss,
    mlp,
    padding_mask,
    randn,
)
from torch import Tensor, nn

import kronfac

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
]

WORLD_SIZES = (2, 3)
SIZES = (5, 11, 7)  # data points (sequences) of ranks 0, 1, 2
BATCH = (3, 4, 3)  # their batch sizes: batches [3, 2], [4, 4, 3], [3, 3, 1]
GLOO_TIMEOUT = 30  # s, of every collective
RUN_TIMEOUT = 90  # s, of a whole spawn: then its processes are killed
DAMPING = 1e-2

Shards = list[list[Any]]  # the batches of each rank
Values = dict[str, Any]  # a case's results by name: tensors, numbers, strings


# ----------------------------------------------------------------------------------------------
# data: the shards of ranks 0, 1, 2 (a world of w ranks takes the first w)


def _batch_sizes(rank: int) -> list[int]:
    n, b = SIZES[rank], BATCH[rank]
    return [b] * (n // b) + ([n % b] if n % b else [])


def _split(batches: list[Any]) -> Shards:
    out, start = [], 0
    for rank in range(len(SIZES)):
        k = len(_batch_sizes(rank))
        out.append(batches[start : start + k])
        start += k
    return out


def flat_shards(loss: str, d_in: int, d_out: int, seed: int) -> Shards:
    """Batches ``(X [B, d_in], y)`` for a ``d_out``-output model, split over the ranks."""
    sizes = [b for r in range(len(SIZES)) for b in _batch_sizes(r)]
    return _split(make_data(d_out, loss, sizes, (d_in,), seed))


VOCAB, T, CLASSES = 11, 6, 3


def seq_shards(loss: str, seed: int) -> Shards:
    """Right-padded token sequences of lengths 1 to ``T``: ``({"input_ids", "attention_mask"},
    y)``, ``y`` real classes at the pads (only the mask drops them; cross-entropy also has a few
    ``ignore_index`` targets) or normal ``[B, T, CLASSES]`` regression targets."""
    g = gen(seed)
    batches = []
    for B in [b for r in range(len(SIZES)) for b in _batch_sizes(r)]:
        lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
        mask = padding_mask(lengths, T)
        ids = torch.randint(1, VOCAB, (B, T), generator=g) * mask  # 0 at the pads
        if loss == "ce":
            y = torch.randint(0, CLASSES, (B, T), generator=g)
            y[torch.rand(B, T, generator=g) < 0.15] = -100
        else:
            y = randn(B, T, CLASSES, g=g)
        batches.append(({"input_ids": ids, "attention_mask": mask}, y))
    return _split(batches)


class Tokens(nn.Module):
    """``Linear(tanh(Embedding(ids)))`` at every position: ``[N, T]`` → ``[N, T, CLASSES]``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.lin = nn.Linear(4, 5)
        self.out = nn.Linear(5, CLASSES)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.out(torch.tanh(self.lin(torch.tanh(self.emb(input_ids)))))


def _classes_dim_1(model: nn.Module, X: Any) -> Tensor:
    return model(**X).transpose(1, 2)  # [N, C, T] for cross-entropy


# ----------------------------------------------------------------------------------------------
# results as plain values (tensors, numbers, strings) that travel through torch.save


def flat_factors(f: kronfac.KroneckerFactors, prefix: str = "") -> Values:
    """Each factor as a dense tensor (low-rank ones reconstructed) with its kind, and the counts."""
    out: Values = {
        f"{prefix}num_data": f.num_data,
        f"{prefix}num_per_example_loss_terms": f.num_per_example_loss_terms,
    }
    for mod in f:
        for side, F in zip("AS", f[mod], strict=True):
            low = isinstance(F, kronfac.LowRankFactor)
            out[f"{prefix}{mod}.{side}"] = F.to_dense() if low else F
            out[f"{prefix}{mod}.{side} kind"] = "low-rank" if low else "dense"
    return out


def probe(op: kronfac.CurvatureOperator, seed: int) -> Tensor:
    """Two deterministic vectors of the operator's size, as columns ``[P, 2]``."""
    return randn(op.to_dense().shape[0], 2, g=gen(seed))


def operator_values(op: Any, V: Tensor, heuristic: bool = True) -> Values:
    out = {
        "dense": op.to_dense(),
        "op @ v": op @ V,
        "inverse @ v": op.inverse(DAMPING) @ V,
        "logdet": op.logdet(DAMPING),
    }
    if heuristic:
        out["heuristic inverse @ v"] = op.inverse(DAMPING, heuristic=True) @ V
    return out


# ----------------------------------------------------------------------------------------------
# the cases: ``run(data, **group)`` builds its seeded model and returns its values; ``group`` is
# ``{}`` (the default group on the ranks, none in the reference) or ``{"process_group": g}``


@dataclass(frozen=True)
class Case:
    shards: Callable[[], Shards]
    run: Callable[..., Values]
    mode: str = "union"  # "union", "agree" (fisher="mc") or "pair" (a group of ranks 0, 1)
    options: Callable[[int], dict[str, Any]] = lambda world: {}  # more options, by world size


def _mlp_factors(loss: str, reduction: str, **options: Any) -> Callable[..., Values]:
    def run(data: list[Any], **group: Any) -> Values:
        model = mlp((6, 5, 3), seed=1)
        f = kronfac.compute_factors(model, make_loss(loss, reduction), data, **options, **group)
        return flat_factors(f)

    return run


def _seq_factors(loss: str, reduction: str, **options: Any) -> Callable[..., Values]:
    def run(data: list[Any], **group: Any) -> Values:
        model = init(Tokens(), seed=4)
        fwd = _classes_dim_1 if loss == "ce" else None
        f = kronfac.compute_factors(
            model, make_loss(loss, reduction), data, forward=fwd, **options, **group
        )
        return flat_factors(f)

    return run


def _lowrank(rank: int, exact: bool) -> Callable[..., Values]:
    """``Linear(40, 30) → tanh → Linear(30, 1)``, MSE, ``rank_threshold=20``: both factors of
    the first layer and ``A`` of the second are low-rank. ``exact``: ``rank=24`` covers the
    union's at most 23 rows, so the factors also equal the full-rank ones."""

    def run(data: list[Any], **group: Any) -> Values:
        model = mlp((40, 30, 1), seed=5)
        kw = dict(fisher="type-2", **group)
        low = kronfac.compute_factors(model, nn.MSELoss(), data, rank=rank, rank_threshold=20, **kw)
        out = flat_factors(low)
        if exact:
            out |= flat_factors(kronfac.compute_factors(model, nn.MSELoss(), data, **kw), "full ")
        return out

    return run


def _operators(loss: str, reduction: str, bias: str) -> Callable[..., Values]:
    def run(data: list[Any], **group: Any) -> Values:
        model = mlp((6, 5, 3), seed=6)
        loss_fn = make_loss(loss, reduction)
        K = kronfac.KFAC(model, loss_fn, data, fisher="type-2", bias=bias, **group)
        return operator_values(K, probe(K, 7)) | flat_factors(K.factors)

    return run


def _ekfac(loss: str, reduction: str, bias: str, seq: bool = False) -> Callable[..., Values]:
    def run(data: list[Any], **group: Any) -> Values:
        model = init(Tokens(), seed=8) if seq else mlp((6, 5, 3), seed=8)
        fwd = _classes_dim_1 if seq and loss == "ce" else None
        E = kronfac.EKFAC(
            model,
            make_loss(loss, reduction),
            data,
            fisher="type-2",
            bias=bias,
            forward=fwd,
            modules=["lin", "out"] if seq else None,
            **group,
        )
        out = operator_values(E, probe(E, 9), heuristic=False) | flat_factors(E.factors)
        for mod, c in (E.factors.corrections or {}).items():
            out[f"{mod} eigenvalues"] = c[2]
        return out

    return run


def _laplace(loss: str, reduction: str, curvature: str) -> Callable[..., Values]:
    def run(data: list[Any], **group: Any) -> Values:
        model = mlp((6, 5, 3), seed=10)
        la = kronfac.Laplace(model, make_loss(loss, reduction), data, curvature=curvature)
        return {
            "curvature": la.curvature.to_dense(),
            "hessian_scale": la.hessian_scale,
            "num_data": la.num_data,
        }

    return run


def _influence(curvature: str) -> Callable[..., Values]:
    """The curvature of the shards' union; the scores of the same batches on every rank."""

    def run(data: list[Any], **group: Any) -> Values:
        model = mlp((6, 5, 3), seed=19)
        inf = kronfac.Influence(
            model, nn.CrossEntropyLoss(), data, curvature=curvature, fisher="type-2"
        )
        scored = flat_shards("ce", 6, 3, seed=20)[1]  # 11 points, not a shard
        return {
            "curvature": inf.curvature.to_dense(),
            "hessian_scale": inf.hessian_scale,
            "pairwise_scores": inf.pairwise_scores(scored, scored[:1]),
            "self_scores": inf.self_scores(scored),
        }

    return run


MC_SEED = 3


def _mc(data: list[Any], seed: int = MC_SEED, **group: Any) -> Values:
    model = mlp((6, 5, 3), seed=11)
    f = kronfac.compute_factors(
        model, nn.CrossEntropyLoss(), data, fisher="mc", mc_samples=2, seed=seed, **group
    )
    return flat_factors(f)


def _ignored_on_rank_1(seed: int) -> Shards:
    """Cross-entropy batches whose targets on rank 1 are all ``ignore_index``: that shard has
    no loss term, the union has."""
    shards = flat_shards("ce", 6, 3, seed)
    shards[1] = [(X, torch.full_like(y, -100)) for X, y in shards[1]]
    return shards


def _cases() -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for loss, reduction in (("mse", "sum"), ("ce", "mean")):
        shards = lambda loss=loss: flat_shards(loss, 6, 3, seed=2)  # noqa: E731
        for fisher in ("type-2", "empirical"):
            for bias in ("joint", "separate"):
                run = _mlp_factors(loss, reduction, fisher=fisher, bias=bias)
                cases[f"mlp-{loss}-{reduction}-{fisher}-{bias}"] = Case(shards, run)
        cases[f"kfac-operator-{loss}-{reduction}"] = Case(
            shards, _operators(loss, reduction, "joint")
        )
        cases[f"ekfac-{loss}-{reduction}"] = Case(shards, _ekfac(loss, reduction, "separate"))
        cases[f"laplace-kfac-{loss}-{reduction}"] = Case(shards, _laplace(loss, reduction, "kfac"))
    for loss, reduction, fisher, approx in (
        ("ce", "mean", "type-2", "expand"),
        ("mse", "mean", "empirical", "reduce"),
        ("mse", "sum", "type-2", "expand"),
    ):
        shards = lambda loss=loss: seq_shards(loss, seed=3)  # noqa: E731
        exclude = "emb" if approx == "reduce" else None  # reduce: no diagonal input factor
        run = _seq_factors(loss, reduction, fisher=fisher, approx=approx, exclude=exclude)
        cases[f"seq-mask-{loss}-{reduction}-{fisher}-{approx}"] = Case(shards, run)
    seq_ce = lambda: seq_shards("ce", seed=12)  # noqa: E731
    cases["ekfac-seq-mask-ce-mean"] = Case(seq_ce, _ekfac("ce", "mean", "joint", seq=True))
    lowrank_data = lambda: flat_shards("mse", 40, 1, seed=13)  # noqa: E731
    cases["lowrank-exact"] = Case(lowrank_data, _lowrank(24, exact=True))
    cases["lowrank-truncated"] = Case(lowrank_data, _lowrank(3, exact=False))
    cases["laplace-ekfac-ce-mean"] = Case(
        lambda: flat_shards("ce", 6, 3, seed=14), _laplace("ce", "mean", "ekfac")
    )
    for curvature in ("kfac", "ekfac"):
        cases[f"influence-{curvature}"] = Case(
            lambda: flat_shards("ce", 6, 3, seed=21), _influence(curvature)
        )
    cases["ce-all-ignored-on-rank-1"] = Case(
        lambda: _ignored_on_rank_1(seed=17), _mlp_factors("ce", "mean", fisher="type-2")
    )
    cases["num-data-given-as-the-union"] = Case(
        lambda: flat_shards("mse", 6, 3, seed=18),
        _mlp_factors("mse", "mean", fisher="empirical"),
        options=lambda world: {"num_data": sum(SIZES[:world])},
    )
    cases["mc-agree"] = Case(lambda: flat_shards("ce", 6, 3, seed=15), _mc, mode="agree")
    cases["process-group-of-ranks-0-1"] = Case(
        lambda: flat_shards("ce", 6, 3, seed=16),
        _mlp_factors("ce", "mean", fisher="type-2", bias="joint"),
        mode="pair",
    )
    cases["process-group-of-ranks-0-1-ekfac"] = Case(
        lambda: flat_shards("mse", 6, 3, seed=22), _ekfac("mse", "mean", "joint"), mode="pair"
    )
    return cases


CASES = _cases()


def union(case: Case, world: int) -> list[Any]:
    """The batches of the ranks that take part, in rank order."""
    ranks = range(2) if case.mode == "pair" else range(world)
    shards = case.shards()
    return [b for r in ranks for b in shards[r]]


# ----------------------------------------------------------------------------------------------
# the processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save(report: dict[str, Any], path: Path) -> None:
    """Atomically: a process killed while writing leaves the previous report."""
    tmp = path.with_suffix(".tmp")
    torch.save(report, tmp)
    os.replace(tmp, path)


def _error() -> dict[str, str]:
    return {"__error__": traceback.format_exc()}


def _meet(
    out: str, name: str, rank: int, world: int, wait: float, seconds: float = 0.0
) -> list[float | None]:
    """Tell the other ranks by a file that this rank is past ``name`` (after ``seconds``) and
    wait for theirs, at most ``wait`` s: not by a collective, which could hang. Returns their
    seconds, ``None`` for a rank that did not come."""
    tmp = Path(out) / f"{name}-{rank}.tmp"
    tmp.write_text(str(seconds))
    os.replace(tmp, tmp.with_suffix(".done"))  # atomically: never read half written
    paths = [Path(out) / f"{name}-{r}.done" for r in range(world)]
    deadline = time.monotonic() + wait
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.02)
    texts = [p.read_text() if p.exists() else "" for p in paths]
    return [float(t) if t else None for t in texts]


def each_on_a_group(
    rank: int,
    world: int,
    port: int,
    out: str,
    names: list[str],
    body: Callable[[str, int, int, str], Values],
    timeout: float,
) -> None:
    """``body(name, rank, world, out)`` for each of ``names``, each on a default process
    group of its own (gloo; the groups meet through one TCPStore; collectives time out after
    ``timeout`` s): a rank that skips a collective or hangs in one spoils that case only. The
    ranks wait for each other between two cases by files; the report is written before and
    after every case."""
    torch.set_num_threads(1)
    path, report = Path(out) / f"rank{rank}.pt", {}
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timedelta(seconds=timeout + 30))
    for name in names:
        report["__running__"] = name
        _save(report, path)
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore(f"{name}/", store),
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout),
        )
        try:
            report[name] = body(name, rank, world, out)
        except Exception:
            report[name] = _error()
        finally:
            dist.destroy_process_group()
        _save(report, path)
        _meet(out, name, rank, world, wait=timeout + 10)  # past a hung rank's timeout
    del report["__running__"]
    _save(report, path)


def case_body(name: str, rank: int, world: int, out: str) -> Values:
    """Case ``name`` on this rank's shard, on the default group."""
    case = CASES[name]
    if case.mode != "pair":
        return case.run(case.shards()[rank], **case.options(world))
    pair = dist.new_group([0, 1])  # every rank creates every group
    if rank >= 2:
        return {"__skipped__": "not in the group"}
    return case.run(case.shards()[rank], process_group=pair, **case.options(world))


def case_worker(rank: int, world: int, port: int, out: str) -> None:
    each_on_a_group(rank, world, port, out, list(CASES), case_body, GLOO_TIMEOUT)


def _failing_calls() -> dict[str, tuple[Callable[[list[Any]], Any], Callable, str, str]]:
    """Name → (call on a rank's data, what rank 1 gets instead of its shard, the type of error
    rank 1 must raise, a word of its message). Rank 0 must raise a ``RuntimeError`` naming
    another rank."""
    model, ce = mlp((6, 5, 3), seed=1), nn.CrossEntropyLoss()
    empty = lambda data: []  # noqa: E731
    narrow = lambda data: [(X[:, :4], y) for X, y in data]  # noqa: E731
    one_shot = lambda data: iter(data)  # noqa: E731
    return {
        "compute_factors-empty": (
            lambda data: kronfac.compute_factors(model, ce, data, fisher="type-2"),
            empty,
            "ValueError",
            "empty",
        ),
        "compute_factors-bad-input": (
            lambda data: kronfac.compute_factors(model, ce, data, fisher="type-2"),
            narrow,
            "RuntimeError",
            "mat1",
        ),
        "kfac-empty": (
            lambda data: kronfac.KFAC(model, ce, data, fisher="type-2"),
            empty,
            "ValueError",
            "empty",
        ),
        "ekfac-empty": (
            lambda data: kronfac.EKFAC(model, ce, data, fisher="type-2"),
            empty,
            "ValueError",
            "empty",
        ),
        "ekfac-one-shot-iterator": (
            lambda data: kronfac.EKFAC(model, ce, data, fisher="type-2"),
            one_shot,
            "TypeError",
            "one-shot",
        ),
        "laplace-one-shot-iterator": (
            lambda data: kronfac.Laplace(model, ce, data),
            one_shot,
            "TypeError",
            "one-shot",
        ),
        "laplace-empty": (
            lambda data: kronfac.Laplace(model, ce, data),
            empty,
            "ValueError",
            "empty",
        ),
    }


FAILURES = list(_failing_calls())
FAIL_GLOO_TIMEOUT = 10  # s: a rank left waiting in a collective raises after this
FAIL_RUN_TIMEOUT = 100  # s: then the processes are killed
FAILURE_AFTER = Case(
    lambda: flat_shards("ce", 6, 3, seed=2), _mlp_factors("ce", "mean", fisher="type-2")
)


def failing_call(name: str, rank: int, world: int, out: str) -> dict[str, Any]:
    """What this rank raised in call ``name`` (rank 1's data replaced) and after how long;
    then, if no rank waited in a collective, its shard's factors on the same group (which must
    still work)."""
    call, replace, _, _ = _failing_calls()[name]
    shard = flat_shards("ce", 6, 3, seed=2)[rank]
    start, record = time.monotonic(), {"raised": None, "message": ""}
    try:
        call(replace(shard) if rank == 1 else shard)
    except Exception as err:
        record = {"raised": type(err).__name__, "message": str(err)}
    record["seconds"] = time.monotonic() - start
    seconds = _meet(out, f"{name}-call", rank, world, FAIL_GLOO_TIMEOUT + 10, record["seconds"])
    if any(s is None or s >= FAIL_GLOO_TIMEOUT / 2 for s in seconds):
        record["after"] = {"__error__": f"not run: the ranks' calls took {seconds} s"}
        return record
    try:
        record["after"] = FAILURE_AFTER.run(shard)
    except Exception:
        record["after"] = _error()
    return record


def failure_worker(rank: int, world: int, port: int, out: str) -> None:
    each_on_a_group(rank, world, port, out, FAILURES, failing_call, FAIL_GLOO_TIMEOUT)


def spawn(target: Callable[..., None], world: int, out: Path, timeout: float) -> dict[str, Any]:
    """``target(rank, world, port, out)`` on ``world`` processes; those not done after
    ``timeout`` s are killed. Returns the reports read back, and who hung or failed."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.0))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    reports = []
    for r in range(world):
        path = out / f"rank{r}.pt"
        reports.append(torch.load(path, weights_only=True) if path.exists() else None)
    return {
        "reports": reports,
        "hung": hung,
        "exitcodes": [p.exitcode for p in procs],
        "timeout": timeout,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Callable[[int], dict[str, Any]]:
    """The spawn of every case, once per world size (on first use)."""
    cache: dict[int, dict[str, Any]] = {}

    def get(world: int) -> dict[str, Any]:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"world{world}")
            start = time.monotonic()
            cache[world] = spawn(case_worker, world, out, RUN_TIMEOUT)
            cache[world]["seconds"] = time.monotonic() - start
        return cache[world]

    return get


# ----------------------------------------------------------------------------------------------
# the tests


def rank_values(run: dict[str, Any], rank: int, name: str) -> Values:
    """What ``rank`` computed for case ``name``, failing with why there is nothing."""
    report = run["reports"][rank]
    where = f"rank {rank} of {len(run['reports'])}"
    if report is None:
        pytest.fail(f"{where} wrote no report (exit code {run['exitcodes'][rank]})")
    if name not in report:
        running = report.get("__running__")
        why = (
            f"hung in case {running!r}, killed after {run['timeout']} s"
            if rank in run["hung"]
            else f"exited with code {run['exitcodes'][rank]} in case {running!r}"
        )
        pytest.fail(f"{where} has no result for {name!r}: it {why}")
    values = report[name]
    if "__error__" in values:
        pytest.fail(f"{where} raised in {name!r}:\n{values['__error__']}")
    return values


def assert_values_close(actual: Values, expected: Values, tol: float, what: str) -> None:
    assert sorted(actual) == sorted(expected), (
        f"{what}: keys {sorted(actual)} != {sorted(expected)}"
    )
    for key, e in expected.items():
        a = actual[key]
        if isinstance(e, Tensor):
            assert_rel_close(a, e, tol, f"{what}: {key}")
        elif isinstance(e, float):
            assert_rel_close(torch.tensor(a), torch.tensor(e), tol, f"{what}: {key}")
        else:
            assert a == e, f"{what}: {key} = {a!r}, expected {e!r}"


def check_mc(all_values: list[Values], ref: Values, what: str) -> None:
    """The ranks agree; the union's keys, shapes and counts; finite and symmetric."""
    for r, values in enumerate(all_values[1:], start=1):
        assert_values_close(values, all_values[0], TOL, f"{what}: rank {r} vs rank 0")
    values = all_values[0]
    assert sorted(values) == sorted(ref), f"{what}: keys {sorted(values)} != {sorted(ref)}"
    for key, e in ref.items():
        a = values[key]
        if not isinstance(e, Tensor):
            assert a == e, f"{what}: {key} = {a!r}, the union's {e!r}"
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, f"{what}: {key} {a.shape} {a.dtype}"
        assert torch.isfinite(a).all(), f"{what}: {key} not finite"
        if a.ndim == 2:
            assert_rel_close(a.T, a, TOL, f"{what}: {key} symmetric")
        assert a.abs().max() > 0, f"{what}: {key} is zero"


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ranks_equal_one_process_on_the_union(runs, world, name):
    case = CASES[name]
    run = runs(world)
    ref = case.run(union(case, world), **case.options(world))  # no process group here
    ranks = range(2) if case.mode == "pair" else range(world)
    all_values = [rank_values(run, r, name) for r in ranks]
    what = f"world {world}, {name}"
    if case.mode == "agree":
        check_mc(all_values, ref, what)
        return
    for r, values in zip(ranks, all_values, strict=True):
        assert_values_close(values, ref, TOL, f"{what}, rank {r}")
    if name == "lowrank-exact":  # the low-rank factors equal the full-rank ones
        for key, e in ref.items():
            if key.startswith("full ") and isinstance(e, Tensor):
                assert_rel_close(all_values[0][key[5:]], e, TOL, f"{what}: {key[5:]} = {key}")
        assert "low-rank" in ref.values(), f"{what}: no low-rank factor"


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_mc_rank_r_samples_with_seed_plus_r(runs, world):
    """Rank ``r`` samples its labels with ``seed + r``: the union's factors are the shards'
    single-process factors at those seeds, weighted by their data points (each ``A`` and ``S``
    is a mean over data points, one term and ``mc_samples`` labels each)."""
    shards = CASES["mc-agree"].shards()
    values = rank_values(runs(world), 0, "mc-agree")
    N = sum(SIZES[:world])
    per_rank = [_mc(shards[r], seed=MC_SEED + r) for r in range(world)]
    for key, a in values.items():
        if isinstance(a, Tensor):
            e = sum(SIZES[r] / N * per_rank[r][key] for r in range(world))
            assert_rel_close(a, e, TOL, f"world {world}: {key}")


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> dict[str, Any]:
    """The spawn of every failing call, on 2 ranks."""
    return spawn(failure_worker, 2, tmp_path_factory.mktemp("failures"), FAIL_RUN_TIMEOUT)


@pytest.mark.parametrize("name", FAILURES)
def test_a_failing_rank_makes_every_rank_raise(failures, name):
    """Rank 1's call raises before the collectives: it raises its own error, rank 0 a
    ``RuntimeError`` naming the failure of another rank, neither waits in a collective, and
    the group still works afterwards (the union's factors)."""
    _, _, error, word = _failing_calls()[name]
    records = []
    for rank in range(2):
        report = failures["reports"][rank]
        if report is None or name not in report:
            hung = rank in failures["hung"]
            pytest.fail(
                f"rank {rank} has no record of {name!r}: "
                + (f"hung, killed after {FAIL_RUN_TIMEOUT} s, " if hung else "")
                + f"exit code {failures['exitcodes'][rank]}"
            )
        records.append(report[name])
    r0, r1 = records
    assert r1["raised"] == error and word in r1["message"], f"rank 1 (its own {error}): {r1}"
    assert r0["raised"] == "RuntimeError" and "rank" in r0["message"], (
        f"rank 0 (a RuntimeError naming rank 1): {r0}"
    )
    for rank, record in enumerate(records):
        assert record["seconds"] < FAIL_GLOO_TIMEOUT / 2, (
            f"rank {rank} waited {record['seconds']:.1f} s (in a collective?): {record}"
        )
    ref = FAILURE_AFTER.run(union(FAILURE_AFTER, 2))
    for rank, record in enumerate(records):
        values = record["after"]
        assert "__error__" not in values, f"rank {rank}, afterwards:\n{values['__error__']}"
        assert_values_close(values, ref, TOL, f"after {name}, rank {rank}")
