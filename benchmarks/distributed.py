"""Factors on torch.distributed: throughput of 2 processes against 1, and the bytes sent.

Two processes (gloo, one torch thread and one BLAS thread each) are spawned once. Per round,
interleaved: **1 process** — rank 0 computes the factors of the whole dataset over a process
group of its own (rank 1 waits at a barrier), then **2 processes** — each rank computes its
half (every other batch) over the world group, and the factors are those of the union. Time:
from a barrier before the call to a barrier after it; median of ``--repeats`` rounds after a
warm-up. Throughput = data points / time; scaling efficiency = the 2-process throughput over
twice the 1-process one. Bytes: what one rank sends into the sums' all-reduce per pass
(``kronfac.distributed.all_reduce_sums``: symmetric sums as upper triangles) against the naive
volume (every sum whole, the same dtype).

    python benchmarks/distributed.py [--repeats 5] [--workloads W1 W3] [--data-times K]
    python benchmarks/distributed.py --optim [--repeats 5]

``--optim``: the optimizer under DistributedDataParallel on W1 (batch 256, 128 per rank):
milliseconds per step of DDP + Adam and DDP + K-FAC (defaults, and factors / inverses every
10 steps), interleaved rounds of 20 steps, median; the bytes kronfac sends per step (its
all-reduces and broadcasts, counted at torch.distributed's Python API, which DDP's own gradient
all-reduce does not use) beside DDP's gradient volume.

``--data-times K`` passes over each workload's batches K times (a K times longer pass: the
all-reduce, once per pass, weighs less).

Workloads (``benchmarks/factors.py``): W1 (MLP 784-512-512-10, 2048 x cross-entropy, 8 batches)
and W3 (Llama 4x256, 32 sequences of 128 tokens, 4 batches), MC Fisher.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import machine
from torch import nn

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _naive_bytes(factors) -> int:
    """The payload if every sum travelled whole: ``d²`` per Gram sum, the factors' dtype."""
    total = 0
    for A, S in factors.values():
        for F in (A, S):
            if isinstance(F, torch.Tensor):
                total += F.numel() * F.element_size()
    return total


def _worker(rank: int, port: int, keys: list[str], repeats: int, times: int, out: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import scipy.linalg.blas  # noqa: F401  (load SciPy's BLAS before limiting it)
    from factors import WORKLOADS
    from threadpoolctl import threadpool_limits

    import kronfac
    import kronfac.factors.engine as engine
    from kronfac.distributed import all_reduce_sums

    threadpool_limits(1)
    warnings.simplefilter("ignore")
    sent: list[int] = []

    def counting(tensors, symmetric, group):
        n = all_reduce_sums(tensors, symmetric, group)
        sent.append(n)
        return n

    engine.all_reduce_sums = counting
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=WORLD,
        init_method=f"tcp://127.0.0.1:{port}",
        timeout=timedelta(minutes=5),
    )
    alone = dist.new_group([0])
    for key in keys:
        result = _time_workload(kronfac, WORKLOADS[key], rank, alone, repeats, times, sent)
        if rank == 0:
            out[key] = result
    dist.destroy_process_group()


def _time_workload(
    kronfac, workload, rank: int, alone, repeats: int, times: int, sent: list[int]
) -> dict:
    """Interleaved rounds of the 1- and 2-process passes of one workload (module docstring)."""
    model, loss_fn, data, opts, title = workload()
    data = data * times  # a longer pass over the same batches
    title += f", {times} passes over its batches" if times > 1 else ""
    n_total = sum(int(y.shape[0]) for _, y in data)
    shard = data[rank::WORLD]

    def one() -> None:
        if rank == 0:
            kronfac.compute_factors(model, loss_fn, data, process_group=alone, **opts)

    def two():
        return kronfac.compute_factors(model, loss_fn, shard, **opts)

    seconds: dict[str, list[float]] = {"1 process": [], "2 processes": []}
    for r in range(repeats + 1):
        for name, fn in (("1 process", one), ("2 processes", two)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            if r:  # the first round warms up
                seconds[name].append(time.perf_counter() - t0)
    sent.clear()
    factors = two()
    return {
        "title": title,
        "n": n_total,
        "times": {k: statistics.median(v) for k, v in seconds.items()},
        "sent": sent[-1],
        "naive": _naive_bytes(factors),
    }


def _count_bytes() -> list[int]:
    """Count the bytes of every all-reduce and broadcast from now on (into the list's item).

    Both torch.distributed's names and its ``distributed_c10d`` module's, which
    ``broadcast_object_list`` calls.
    """
    sent = [0]
    for module in (dist, dist.distributed_c10d):
        for name in ("all_reduce", "broadcast"):
            original = getattr(module, name)

            def counting(tensor, *args, _original=original, **kwargs):
                sent[0] += tensor.numel() * tensor.element_size()
                return _original(tensor, *args, **kwargs)

            setattr(module, name, counting)
    return sent


def _optim_worker(rank: int, port: int, rounds: int, out: dict) -> None:
    """DDP + Adam against DDP + K-FAC on W1 (batch 256: 128 per rank); bytes kronfac sends."""
    torch.set_num_threads(1)
    import scipy.linalg.blas  # noqa: F401  (load SciPy's BLAS before limiting it)
    from threadpoolctl import threadpool_limits

    from kronfac.optim import KFAC

    threadpool_limits(1)
    warnings.simplefilter("ignore")
    sent = _count_bytes()
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}"
    )
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g))]
    loss_fn = nn.CrossEntropyLoss()
    methods = {
        "DDP + Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        "DDP + K-FAC (defaults)": lambda m: KFAC(m, loss_fn=loss_fn),
        "DDP + K-FAC (factor_every=10, inverse_every=10)": lambda m: KFAC(
            m, loss_fn=loss_fn, factor_every=10, inverse_every=10
        ),
    }
    runs = {}
    for name, make in methods.items():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        runs[name] = (nn.parallel.DistributedDataParallel(model), make(model))

    def steps(ddp, opt, n: int) -> None:
        for _ in range(n):
            X, y = batches[0]
            opt.zero_grad()
            loss_fn(ddp(X), y).backward()
            opt.step()

    for ddp, opt in runs.values():
        steps(ddp, opt, 10)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in runs}
    volume: dict[str, float] = {}
    for _ in range(rounds):
        for name, (ddp, opt) in runs.items():
            dist.barrier()
            before, t0 = sent[0], time.perf_counter()
            steps(ddp, opt, 20)
            dist.barrier()
            times[name].append((time.perf_counter() - t0) / 20)
            volume[name] = (sent[0] - before) / 20
    if rank == 0:
        grads = sum(p.numel() * p.element_size() for p in next(iter(runs.values()))[0].parameters())
        out["optim"] = {
            "times": {k: statistics.median(v) for k, v in times.items()},
            "kronfac_bytes": volume,
            "grad_bytes": grads,
        }
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=["W1", "W3"], choices=["W1", "W3"])
    parser.add_argument(
        "--data-times", type=int, default=1, help="pass over each workload's batches K times"
    )
    parser.add_argument(
        "--optim", action="store_true", help="DDP step time and bytes: Adam against K-FAC (W1)"
    )
    args = parser.parse_args(argv)
    if args.optim:
        return _optim(args.repeats)
    out = mp.Manager().dict()
    spawn_args = (_free_port(), args.workloads, args.repeats, args.data_times, out)
    mp.spawn(_worker, args=spawn_args, nprocs=WORLD)
    print(f"Machine: {machine()}; each process 1 torch thread, 1 BLAS thread, gloo\n")
    print(
        "| workload | 1 process: points/s | 2 processes: points/s | speed-up | efficiency | "
        "bytes sent per pass | naive bytes | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key in args.workloads:
        r = out[key]
        t1, t2 = r["times"]["1 process"], r["times"]["2 processes"]
        speed = t1 / t2
        print(
            f"| {r['title']} | {r['n'] / t1:.0f} | {r['n'] / t2:.0f} | {speed:.2f}x | "
            f"{speed / WORLD:.0%} | {r['sent'] / 1e6:.2f} MB | {r['naive'] / 1e6:.2f} MB | "
            f"{r['sent'] / r['naive']:.2f} |"
        )
    return 0


def _optim(rounds: int) -> int:
    out = mp.Manager().dict()
    mp.spawn(_optim_worker, args=(_free_port(), rounds, out), nprocs=WORLD)
    r = out["optim"]
    print(f"Machine: {machine()}; 2 processes x 1 torch thread, 1 BLAS thread, gloo")
    print("W1 MLP 784-512-512-10, batch 256 (128 per rank), cross-entropy\n")
    print(
        "| method | ms / step | x DDP + Adam | kronfac's bytes / step "
        "| with DDP's gradients, x them |"
    )
    print("|---|---|---|---|---|")
    base = r["times"]["DDP + Adam"]
    for name, t in r["times"].items():
        extra = r["kronfac_bytes"][name]
        total = (extra + r["grad_bytes"]) / r["grad_bytes"]
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f} | {extra / 1e6:.3f} MB | {total:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
