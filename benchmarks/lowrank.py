"""Low-rank vs full-rank factors on an LLM-sized model (issue 5).

A ``LlamaForCausalLM`` (hidden 1024, intermediate 2752, 4 layers, 8 heads, vocab 1000, random
weights) with peft LoRA adapters (r = 8 on q_proj and v_proj), 16 sequences of 128 tokens in
batches of 8, token-level cross-entropy, fisher "mc":

- time of ``compute_factors`` on the LoRA adapters and on the base Linear layers, full rank and
  ``rank=16`` (threshold 512, the default sketch width), as ratios to BASE (forward +
  backward), interleaved in one process, median of ``--repeats`` runs after a warm-up;
  ``--oversample P`` adds each rank-16 configuration with ``oversample=P`` (sketch width
  ``16 + P``) to the same interleaved runs, e.g. ``--oversample 10`` for the former default;
- peak memory of each configuration, each in a fresh child process: the peak resident set
  (``VmHWM``, reset through ``/proc/self/clear_refs`` after building the model) over the
  model's own footprint (activations and gradients included). Linux only.

``--accuracy`` instead prints the truncation table of :mod:`kronfac.linalg.lowrank`: the
rank-``k`` Frobenius error of the streamed sketch over the optimal one, with ``p = 10`` and the
default width, on inputs whose covariance has the spectrum ``ρ^i`` (no model).

    python benchmarks/lowrank.py [--repeats 3] [--oversample P ...]
    python benchmarks/lowrank.py --accuracy
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import os
import subprocess
import sys
import warnings

import torch
from _common import interleaved, machine, setup_threads
from torch import nn

import kronfac
from kronfac.linalg import StreamingLowRank

CONFIGS = {
    "LoRA adapters, full rank": {"modules": ["lora_"]},
    "LoRA adapters, rank 16": {"modules": ["lora_"], "rank": 16},
    "base Linear layers, full rank": {"modules": ["base_layer", "o_proj", "mlp."]},
    "base Linear layers, rank 16": {"modules": ["base_layer", "o_proj", "mlp."], "rank": 16},
}


def configs(oversample: list[int]) -> dict[str, dict]:
    """:data:`CONFIGS`, each rank-16 configuration followed by its ``oversample=P`` copies."""
    out = {}
    for name, options in CONFIGS.items():
        out[name] = options
        if "rank" in options:
            for p in oversample:
                out[f"{name}, oversample {p}"] = {**options, "oversample": p}
    return out


SPECTRA = (0.8, 0.9, 0.95, 0.99)
RANKS = (1, 4, 8, 16, 32, 64)


def accuracy(draws: int = 5) -> None:
    """Print ``‖C − Ĉ_k‖_F / ‖C − C_k‖_F`` with ``p = 10`` and the default, the largest over
    ``draws`` draws of ``C = XᵀX``, ``X = Z diag(√λ) Qᵀ`` (``λ_i = ρ^i``, ``d = 600``,
    ``N = 1024`` rows streamed in batches of 128, ``Z`` Gaussian, ``Q`` random orthogonal).
    ``C_k`` keeps the top ``k`` eigen-pairs of ``C``: the optimal rank-``k`` error (Eckart–Young).
    """
    d, n, batch = 600, 1024, 128
    cpu = torch.device("cpu")
    worst: dict[tuple[int, int | None, float], float] = {}
    widths: dict[tuple[int, int | None], int] = {}
    for rho, draw in itertools.product(SPECTRA, range(draws)):
        g = torch.Generator().manual_seed(draw)
        Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
        scales = (rho ** torch.arange(d, dtype=torch.float64)).sqrt()
        X = (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ Q.T
        C = X.T @ X
        evals = torch.linalg.eigvalsh(C)  # ascending
        for k, p in itertools.product(RANKS, (10, None)):
            sketch = StreamingLowRank(d, k, cpu, p)
            for rows in X.split(batch):
                sketch.update(rows)
            approx = sketch.result(1.0, torch.float64).to_dense()
            ratio = float(torch.linalg.matrix_norm(C - approx) / evals[:-k].norm())
            worst[k, p, rho] = max(worst.get((k, p, rho), 0.0), ratio)
            widths[k, p] = sketch.width
    print(f"d = {d}, N = {n}, largest ratio over {draws} draws; p = 10 / default\n")
    print("| k | width | " + " | ".join(f"{rho}^i" for rho in SPECTRA) + " |")
    print("|---" * (2 + len(SPECTRA)) + "|")
    for k in RANKS:
        cells = [f"{worst[k, 10, rho]:.3f} / {worst[k, None, rho]:.3f}" for rho in SPECTRA]
        print(f"| {k} | {widths[k, 10]} / {widths[k, None]} | " + " | ".join(cells) + " |")


def build() -> tuple[nn.Module, list]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=1024,
        intermediate_size=2752,
        num_hidden_layers=4,
        num_attention_heads=8,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    for name, p in model.named_parameters():  # the base layers' factors need trainable weights
        if "base_layer" in name or "o_proj" in name or "mlp." in name:
            p.requires_grad_(True)
    ids = torch.randint(0, 1000, (16, 129))
    data = [({"input_ids": ids[i : i + 8, :-1]}, ids[i : i + 8, 1:]) for i in range(0, 16, 8)]
    return model, data


def logits(model: nn.Module, X: dict) -> torch.Tensor:
    return model(**X).logits.transpose(1, 2)


def base_pass(model: nn.Module, data: list) -> None:
    for X, y in data:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(logits(model, X), y).backward()


def factors(model: nn.Module, data: list, options: dict) -> kronfac.KroneckerFactors:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kronfac.compute_factors(
            model, nn.CrossEntropyLoss(), data, fisher="mc", forward=logits, **options
        )


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> float:
    """Release freed heap, reset the peak-RSS mark (Linux), and return the current RSS in MiB."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS")


def peak_mib() -> float:
    """The peak RSS since :func:`reset_peak` (``VmHWM``), in MiB."""
    return _status_mib("VmHWM")


def child(name: str, options: dict) -> None:
    """Measure one configuration's peak memory increase in this (fresh) process."""
    setup_threads()
    model, data = build()
    gc.collect()
    before = reset_peak()  # the model's own footprint; no pass has run in this process
    if name == "BASE":
        base_pass(model, data)
    else:
        factors(model, data, options)
    print(json.dumps({"name": name, "increase_mib": peak_mib() - before}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--oversample",
        type=int,
        nargs="*",
        default=[],
        metavar="P",
        help="also time the rank-16 configurations with oversample=P",
    )
    parser.add_argument(
        "--accuracy", action="store_true", help="print the truncation table instead (no model)"
    )
    parser.add_argument("--child")
    args = parser.parse_args(argv)
    if args.accuracy:
        accuracy()
        return 0
    table = configs(args.oversample)
    if args.child:
        child(args.child, table.get(args.child, {}))
        return 0
    setup_threads()
    model, data = build()
    fns = {"BASE (forward+backward)": lambda: base_pass(model, data)}
    for name, options in table.items():
        fns[name] = lambda o=options: factors(model, data, o)
    medians = interleaved(fns, args.repeats)
    memory = {}
    oversample = [str(p) for p in args.oversample]
    for name in ["BASE", *table]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, "--oversample", *oversample],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        memory[name] = json.loads(out.stdout.strip().splitlines()[-1])["increase_mib"]
    base = medians["BASE (forward+backward)"]
    print(f"Machine: {machine()}\n")
    print("| configuration | median s | x BASE | peak memory increase, MiB |")
    print("|---|---|---|---|")
    for name, t in medians.items():
        mem = memory["BASE" if name.startswith("BASE") else name]
        print(f"| {name} | {t:.2f} | {t / base:.2f} | {mem:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
