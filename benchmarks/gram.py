"""The Gram kernels of ``kronfac.linalg.accumulate_gram`` side by side, per device.

Times ``C += xᵀ x`` for ``x: [m, d]`` with each kernel of ``kronfac.linalg.gram_kernel``:
``"gemm"`` (one ``addmm_``), ``"blocks"`` (the triangular block split: ``⌈d / 256⌉`` row blocks,
``(k + 1) / (2k)`` of the GEMM's flops) and, on CPU, ``"syrk"`` (SciPy BLAS). Interleaved,
median of ``--repeats`` rounds of ``--calls`` calls; CUDA timings synchronise around each round.
Prints a Markdown table of times relative to ``addmm_`` per device (CPU always, CUDA when
available): the measurement that decides what ``"auto"`` runs on each device.

    python benchmarks/gram.py [--repeats 7] [--calls 20] [--threads N] [--blas-threads N]
                               [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import blas_limit, interleaved, machine, setup_threads

from kronfac.linalg import accumulate_gram, gram_kernel

SHAPES = [(256, 785), (256, 512), (1024, 688), (8192, 256), (2048, 1024), (4096, 4096)]
"""``(m, d)``: the issue's table (W1 layers, a Llama MLP's rows, a token batch) and two larger."""


def kernel_call(C: torch.Tensor, x: torch.Tensor, kernel: str, calls: int):
    """A function running ``calls`` accumulations with ``kernel`` (synchronised on CUDA)."""

    def run() -> None:
        with gram_kernel(kernel):
            for _ in range(calls):
                accumulate_gram(C, x)
        if C.is_cuda:
            torch.cuda.synchronize()

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch threads (default: cores)")
    parser.add_argument("--blas-threads", type=int, help="BLAS threads, via threadpoolctl")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    args = parser.parse_args(argv)
    setup_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    limit, note = blas_limit(args.blas_threads)
    with limit:
        run(getattr(torch, args.dtype), args, note)
    return 0


def run(dtype: torch.dtype, args: argparse.Namespace, note: str) -> None:
    """Print the table's rows for every device and shape."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = f", {torch.cuda.get_device_name()}" if len(devices) > 1 else ""
    print(f"Machine: {machine()}{note}{gpu}")
    print(f"\n{args.dtype}, median of {args.repeats} rounds of {args.calls} calls\n")
    print("| device | m x d | addmm_ ms | blocks / addmm_ | syrk / addmm_ |")
    print("|---|---|---|---|---|", flush=True)
    for device in devices:
        kernels = ["gemm", "blocks"]
        if device == "cpu" and dtype != torch.bfloat16:
            kernels.append("syrk")
        for m, d in SHAPES:
            if device == "cpu" and m * d > 4_000_000:
                continue  # the largest shape only where a GPU runs it in reasonable time
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(m, d, generator=g, device=device).to(dtype)
            C = torch.zeros(d, d, device=device, dtype=dtype)
            fns = {k: kernel_call(C, x, k, args.calls) for k in kernels}
            t = interleaved(fns, args.repeats)
            base = t["gemm"]
            syrk = f"{t['syrk'] / base:.2f}" if "syrk" in t else "–"
            print(
                f"| {device} | {m} x {d} | {base / args.calls * 1e3:.3f} | "
                f"{t['blocks'] / base:.2f} | {syrk} |",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
