"""Time ``kronfac.compute_factors`` against a plain forward + loss + backward pass (BASE).

Workloads (issue 2):

- W1: MLP 784-512-512-10 (ReLU), cross-entropy (mean), 2048 samples in batches of 256;
- W3: transformers ``LlamaForCausalLM`` from a small ``LlamaConfig`` (random weights), 32
  sequences of 128 tokens in batches of 8, token-level cross-entropy, factors on the decoder
  layers' Linear modules.

Every configuration runs in one process, interleaved with BASE, median of ``--repeats`` runs
after a warm-up, torch threads = cores. Prints a Markdown table of ratios to BASE.

    python benchmarks/factors.py [--repeats 5] [--workloads W1 W3] [--peers]

``--peers`` also times curvlinops' ``KFACLinearOperator`` on W1 when it is installed.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import interleaved, machine, setup_threads
from torch import nn

import kronfac


def w1() -> tuple[nn.Module, nn.Module, list, dict, str]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    X, y = torch.randn(2048, 784), torch.randint(0, 10, (2048,))
    data = [(X[i : i + 256], y[i : i + 256]) for i in range(0, 2048, 256)]
    return model, nn.CrossEntropyLoss(), data, {}, "W1 MLP 784-512-512-10, 2048 x CE"


class _Logits(nn.Module):
    """Wraps a causal LM so that it returns logits [N, V, T] for token-level CE."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits.transpose(1, 2)


def w3() -> tuple[nn.Module, nn.Module, list, dict, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    model = _Logits(LlamaForCausalLM(config))
    ids = torch.randint(0, 1000, (32, 129))
    data = [(ids[i : i + 8, :-1], ids[i : i + 8, 1:]) for i in range(0, 32, 8)]
    return model, nn.CrossEntropyLoss(), data, {"modules": ["layers."]}, "W3 Llama 4x256, 32x128 tok"


def base_pass(model: nn.Module, loss_fn: nn.Module, data: list) -> None:
    """BASE: forward + loss + backward (weight gradients) over every batch."""
    for X, y in data:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()


def curvlinops_pass(model: nn.Module, loss_fn: nn.Module, data: list, fisher: str) -> None:
    from curvlinops import KFACLinearOperator

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    KFACLinearOperator(
        model,
        loss_fn,
        params,
        data,
        fisher_type=fisher,
        check_deterministic=False,
        separate_weight_and_bias=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=["W1", "W3"])
    parser.add_argument("--peers", action="store_true")
    args = parser.parse_args(argv)
    setup_threads()
    print(f"Machine: {machine()}\n")
    print("| workload | configuration | median s | x BASE |")
    print("|---|---|---|---|")
    for key in args.workloads:
        model, loss_fn, data, opts, title = {"W1": w1, "W3": w3}[key]()
        fishers = ["mc", "empirical", "type-2"] if key == "W1" else ["mc", "empirical"]
        fns = {"BASE (forward+backward)": lambda: base_pass(model, loss_fn, data)}
        for fisher in fishers:
            fns[f"kronfac {fisher}"] = lambda f=fisher: kronfac.compute_factors(
                model, loss_fn, data, fisher=f, **opts
            )
        if args.peers and key == "W1":
            try:
                import curvlinops  # noqa: F401
            except ImportError:
                print("(curvlinops not installed: peers skipped)", file=sys.stderr)
            else:
                for fisher in ("mc", "type-2"):
                    fns[f"curvlinops {fisher}"] = lambda f=fisher: curvlinops_pass(
                        model, loss_fn, data, f
                    )
        medians = interleaved(fns, args.repeats)
        base = medians["BASE (forward+backward)"]
        for name, t in medians.items():
            print(f"| {title} | {name} | {t:.3f} | {t / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
