"""Shared timing helpers for the benchmark scripts: interleaved runs, medians, machine info."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def setup_threads() -> int:
    """Use one torch thread per core, as the benchmarks specify; returns the count."""
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores


def machine() -> str:
    """One line describing the machine and the software."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict:
    """Run every function ``warmup`` times, then ``repeats`` rounds in turn; median seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def blas_limit(threads: int | None) -> tuple[contextlib.AbstractContextManager, str]:
    """A context limiting the BLAS libraries to ``threads`` and a note for the Machine line.

    threadpoolctl limits only the libraries loaded when it is called, and kronfac imports
    ``scipy.linalg.blas`` (its own OpenBLAS, which runs syrk) on first use: it is imported
    here first, or the limit would miss it.
    """
    if threads is None:
        return contextlib.nullcontext(), ""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        note = f", --blas-threads {threads} ignored (threadpoolctl not importable)"
        return contextlib.nullcontext(), note
    with contextlib.suppress(ImportError):
        import scipy.linalg.blas  # noqa: F401
    limit = threadpool_limits(limits=threads, user_api="blas")  # applied now, undone on exit
    libs = [
        f"{i['internal_api']} {i['filepath'].rsplit('/', 1)[-1]}: {i['num_threads']}"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    ]
    return limit, f", BLAS threads ({'; '.join(libs) or 'no BLAS library loaded'})"
