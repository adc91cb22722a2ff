"""Time ``kronfac.compute_factors`` against a plain forward + loss + backward pass (BASE).

Workloads (issue 2):

- W1: MLP 784-512-512-10 (ReLU), cross-entropy (mean), 2048 samples in batches of 256;
- W2 (issue 4): Conv2d(3,32,3,pad 1)-ReLU-Conv2d(32,64,3,pad 1)-ReLU-AdaptiveAvgPool(4)-
  Flatten-Linear(1024,10), 3x32x32 inputs, 1024 samples in batches of 128, cross-entropy;
- W3: transformers ``LlamaForCausalLM`` from a small ``LlamaConfig`` (random weights), 32
  sequences of 128 tokens in batches of 8, token-level cross-entropy, factors on the decoder
  layers' Linear modules;
- GPT2 (issue 4): ``GPT2LMHeadModel`` (4 layers, 256 wide, 4 heads, vocab 1000), 32 x 128
  tokens in batches of 8, token-level cross-entropy, factors on the blocks' Conv1D modules;
- W3flat (issue 11): W3 wrapped as curvlinops-style code writes it, a module whose output is
  the flattened token logits ``[N·T, V]`` (``logits.reshape(-1, V)``) with targets ``[N·T]``.

Every configuration runs in one process, interleaved with BASE, median of ``--repeats`` runs
after a warm-up, torch threads = cores unless ``--threads``. Prints a Markdown table of ratios
to BASE.

    python benchmarks/factors.py [--repeats 5] [--workloads W1 W3] [--peers] [--kernels]
                                 [--threads N] [--blas-threads N]

``--peers`` also times curvlinops' ``KFACLinearOperator`` on W1, W2 and W3flat when it is
installed.

``--kernels`` times the Gram kernel of the factor sums (:mod:`kronfac.linalg.gram`) instead:
kronfac mc and empirical with ``gram_kernel("gemm")`` (``addmm_`` everywhere, the kernel
before syrk) and with the default kernel (``"auto"``, SciPy BLAS syrk where it applies), with
``--peers`` curvlinops mc on W1 and W2 and mc / empirical on W3flat.

``--threads N`` sets torch's threads; ``--blas-threads N`` limits the BLAS libraries'
threads (SciPy's OpenBLAS, which runs syrk) through ``threadpoolctl`` when it is importable (it
ships with scikit-learn; otherwise the Machine line says so and the limit is not applied). The
syrk before / after table (one torch thread, one BLAS thread, 3 repeats):

    python benchmarks/factors.py --kernels --peers --threads 1 --blas-threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
from _common import blas_limit, interleaved, machine, setup_threads
from torch import nn

import kronfac
from kronfac.linalg import gram_kernel


def w1() -> tuple[nn.Module, nn.Module, list, dict, str]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    X, y = torch.randn(2048, 784), torch.randint(0, 10, (2048,))
    data = [(X[i : i + 256], y[i : i + 256]) for i in range(0, 2048, 256)]
    return model, nn.CrossEntropyLoss(), data, {}, "W1 MLP 784-512-512-10, 2048 x CE"


def w2() -> tuple[nn.Module, nn.Module, list, dict, str]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(1024, 10),
    )
    X, y = torch.randn(1024, 3, 32, 32), torch.randint(0, 10, (1024,))
    data = [(X[i : i + 128], y[i : i + 128]) for i in range(0, 1024, 128)]
    return model, nn.CrossEntropyLoss(), data, {}, "W2 CNN 3x32x32, 1024 x CE"


def gpt2() -> tuple[nn.Module, nn.Module, list, dict, str]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000, n_positions=128)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, 1000, (32, 129))
    data = [({"input_ids": ids[i : i + 8, :-1]}, ids[i : i + 8, 1:]) for i in range(0, 32, 8)]
    opts = {"modules": ["h."], "forward": lm_logits}
    return model, nn.CrossEntropyLoss(), data, opts, "GPT-2 4x256, 32x128 tok"


def lm_logits(model: nn.Module, X: dict) -> torch.Tensor:
    """Token-level logits [N, V, T] of a transformers causal LM (cross-entropy's class dim 1)."""
    return model(**X).logits.transpose(1, 2)


def w3_llama() -> tuple[nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    return LlamaForCausalLM(config), torch.randint(0, 1000, (32, 129))


def w3() -> tuple[nn.Module, nn.Module, list, dict, str]:
    model, ids = w3_llama()
    data = [({"input_ids": ids[i : i + 8, :-1]}, ids[i : i + 8, 1:]) for i in range(0, 32, 8)]
    opts = {"modules": ["layers."], "forward": lm_logits}
    return model, nn.CrossEntropyLoss(), data, opts, "W3 Llama 4x256, 32x128 tok"


class FlatLogits(nn.Module):
    """A causal LM as curvlinops-style code wraps it: token ids in, ``[N·T, V]`` logits out."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids).logits
        return logits.reshape(-1, logits.shape[-1])


def w3flat() -> tuple[nn.Module, nn.Module, list, dict, str]:
    lm, ids = w3_llama()
    data = [(ids[i : i + 8, :-1], ids[i : i + 8, 1:].reshape(-1)) for i in range(0, 32, 8)]
    opts = {"modules": ["layers."]}
    return FlatLogits(lm), nn.CrossEntropyLoss(), data, opts, "W3 flattened logits [N·T, V]"


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "GPT2": gpt2, "W3flat": w3flat}


def base_pass(model: nn.Module, loss_fn: nn.Module, data: list, forward=None) -> None:
    """BASE: forward + loss + backward (weight gradients) over every batch."""
    for X, y in data:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X) if forward is None else forward(model, X), y).backward()


def curvlinops_pass(
    model: nn.Module, loss_fn: nn.Module, data: list, fisher: str, modules: list | None = None
) -> None:
    from curvlinops import KFACLinearOperator

    if modules is None:
        params = [p for p in model.parameters() if p.requires_grad]  # 3.0.1 takes a list
    else:  # the Linear layers kronfac's `modules=` selects
        params = [
            p
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(s in name for s in modules)
            for p in m.parameters()
        ]
    op = KFACLinearOperator(
        model,
        loss_fn,
        params,
        data,
        fisher_type=fisher,
        check_deterministic=False,
        separate_weight_and_bias=False,
    )
    op.compute_kronecker_factors()  # 3.0.1 computes them lazily otherwise


def warnings_off(fn, *args, **kwargs):
    """Call ``fn`` with the uncovered-parameter warning silenced (LayerNorms are expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kronfac.UncoveredParameterWarning)
        return fn(*args, **kwargs)


def add_peers(fns: dict, key: str, model, loss_fn, data, opts: dict, fishers) -> None:
    """Add curvlinops rows for ``fishers`` to ``fns`` when curvlinops is installed."""
    try:
        import curvlinops  # noqa: F401
    except ImportError:
        print("(curvlinops not installed: peers skipped)", file=sys.stderr)
        return
    for fisher in fishers:
        fns[f"curvlinops {fisher}"] = lambda f=fisher: curvlinops_pass(
            model, loss_fn, data, f, opts.get("modules")
        )


def print_rows(title: str, fns: dict, repeats: int) -> None:
    """Time ``fns`` interleaved (the first is BASE) and print one table row per entry."""
    medians = interleaved(fns, repeats)
    base = medians[next(iter(fns))]
    for name, t in medians.items():
        print(f"| {title} | {name} | {t:.3f} | {t / base:.2f} |", flush=True)


def run_workload(key: str, repeats: int, peers: bool) -> None:
    """Time BASE and every configuration of one workload, interleaved; print table rows."""
    model, loss_fn, data, opts, title = WORKLOADS[key]()
    fwd = opts.get("forward")
    fns = {"BASE (forward+backward)": lambda: base_pass(model, loss_fn, data, fwd)}
    fishers = ["mc", "empirical", "forward-only"] + (["type-2"] if key == "W1" else [])
    for fisher in fishers:
        fns[f"kronfac {fisher}"] = lambda f=fisher: warnings_off(
            kronfac.compute_factors, model, loss_fn, data, fisher=f, **opts
        )
    if peers and key in ("W1", "W2", "W3flat"):
        peer_fishers = ("mc", "empirical") if key == "W3flat" else ("mc", "type-2")
        add_peers(fns, key, model, loss_fn, data, opts, peer_fishers)
    print_rows(title, fns, repeats)


KERNEL_PEERS = {"W1": ("mc",), "W2": ("mc",), "W3flat": ("mc", "empirical")}
"""curvlinops fishers of ``--kernels --peers`` per workload."""


def run_kernels(key: str, repeats: int, peers: bool) -> None:
    """Time BASE and kronfac with ``gram_kernel("gemm")`` / the default, interleaved."""
    model, loss_fn, data, opts, title = WORKLOADS[key]()
    fwd = opts.get("forward")
    fns = {"BASE (forward+backward)": lambda: base_pass(model, loss_fn, data, fwd)}

    def factors(fisher: str, kernel: str) -> None:
        with gram_kernel(kernel):
            warnings_off(kronfac.compute_factors, model, loss_fn, data, fisher=fisher, **opts)

    for fisher in ("mc", "empirical"):
        for kernel, label in (("gemm", 'gram_kernel("gemm")'), ("auto", "default kernel")):
            fns[f"kronfac {fisher}, {label}"] = lambda f=fisher, k=kernel: factors(f, k)
    if peers and key in KERNEL_PEERS:
        add_peers(fns, key, model, loss_fn, data, opts, KERNEL_PEERS[key])
    print_rows(title, fns, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--peers", action="store_true")
    parser.add_argument(
        "--kernels", action="store_true", help='gram_kernel("gemm") against the default kernel'
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: cores)")
    parser.add_argument("--blas-threads", type=int, help="BLAS threads, via threadpoolctl")
    args = parser.parse_args(argv)
    setup_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    limit, note = blas_limit(args.blas_threads)
    run = run_kernels if args.kernels else run_workload
    with limit:
        print(f"Machine: {machine()}{note}\n")
        print("| workload | configuration | median s | x BASE |")
        print("|---|---|---|---|", flush=True)
        for key in args.workloads:
            run(key, args.repeats, args.peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
