"""Bayesian LoRA on scikit-learn's digits: MAP against the Laplace approximation, and its cost.

Task: each 8x8 digit is a sequence of its 64 pixels (intensities 0–16, one token each) and a
query token; a 2-layer GPT-2 built from a config (random weights, width ``--width``) reads the
class from the query position's logits of 10 answer tokens (vocabulary 28).

1. Data: a stratified split of the 1797 digits into pretraining (``--pretrain``), fine-tuning
   (``--finetune``), validation (``--val``) and test (``--test``) digits, batches of
   ``--batch``; the rest is not used.
2. Base: the whole model, AdamW (lr 3e-3), ``--base-epochs`` epochs on the pretraining split.
3. MAP: the base frozen, peft LoRA adapters (rank ``--rank``, alpha twice that, on every
   ``Conv1D``: ``c_attn``, ``c_proj``, ``c_fc``) fine-tuned with AdamW (lr 1e-2, no weight
   decay) for ``--lora-epochs`` epochs on the small fine-tuning split.
4. ``kronfac.Laplace`` (K-FAC, type-2 Fisher) over the adapters (``modules=["lora"]``) from the
   fine-tuning batches, the prior precision tuned by the marginal likelihood (Adam on
   ``log δ``, 100 steps) or by ``"gridsearch"`` over ``δ = 10^k``, ``k = -4, ..., 4`` on the
   validation batches.
5. Test accuracy, NLL and ECE (15 equal-width confidence bins) of the MAP's softmax and of the
   two Laplace probit predictives.
6. Cost, relative to one forward+backward pass (loss of the LoRA model, gradients of the
   adapters) of a batch of ``--batch`` test sequences: the time (``--rounds`` interleaved
   rounds after a warm-up, median) and the peak memory of constructing ``la`` (a pass over
   the fine-tuning batches) and of ``la.functional_variance`` of the batch. Peak memory is the
   peak resident set size above the one before the call (Linux, glibc): ``malloc_trim``
   first returns malloc's free memory to the system (else a call would reuse it unseen), the
   high-water mark is reset through ``/proc/self/clear_refs`` and read with
   ``resource.getrusage`` (``ru_maxrss``). ``tracemalloc`` would not see torch's tensors.

Usage::

    python benchmarks/laplace_lora.py                   # the defaults: about 3 minutes, one core
    python benchmarks/laplace_lora.py --base-epochs 1 --lora-epochs 1 --test 100 --rounds 1
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import time
import warnings
from collections.abc import Callable, Sequence

import peft
import torch
import transformers
from _common import interleaved, machine
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import kronfac
from kronfac.demo import format_table

PIXEL_LEVELS = 17  # tokens 0..16: the pixel intensities
QUERY = PIXEL_LEVELS  # token 17, after the pixels
ANSWERS = torch.arange(PIXEL_LEVELS + 1, PIXEL_LEVELS + 11)  # tokens 18..27: the classes
VOCAB = PIXEL_LEVELS + 11
ECE_BINS = 15
GRID = [10.0**k for k in range(-4, 5)]

Batch = tuple[dict[str, Tensor], Tensor]


def digit_batches(args: argparse.Namespace) -> dict[str, list[Batch]]:
    """Batches ``({"input_ids": [B, 65]}, classes [B])`` of each split, by name."""
    digits = load_digits()
    tokens = torch.tensor(digits.data, dtype=torch.long)
    ids = torch.cat([tokens, torch.full((len(tokens), 1), QUERY)], dim=1)
    y = torch.tensor(digits.target)
    rest, splits = torch.arange(len(y)), {}
    for name in ("pretrain", "finetune", "val", "test"):
        splits[name], rest = train_test_split(
            rest, train_size=getattr(args, name), stratify=y[rest], random_state=args.seed
        )
    return {
        name: [
            ({"input_ids": ids[subset[i : i + args.batch]]}, y[subset[i : i + args.batch]])
            for i in range(0, len(subset), args.batch)
        ]
        for name, subset in splits.items()
    }


def answer_logits(model: nn.Module, X: dict[str, Tensor]) -> Tensor:
    """The query position's logits of the answer tokens, ``[B, 10]``."""
    return model(**X).logits[:, -1, ANSWERS]


def base_model(args: argparse.Namespace) -> nn.Module:
    """A 2-layer GPT-2 of width ``--width`` (4 heads, no dropout) with random weights."""
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=65,
        n_embd=args.width,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=QUERY,
        eos_token_id=QUERY,
        attn_implementation="eager",  # SDPA has no vmap batching rule on CPU: a loop per sequence
    )
    return transformers.GPT2LMHeadModel(config)


def train(model: nn.Module, data: Sequence[Batch], epochs: int, lr: float, seed: int) -> None:
    """AdamW on the trainable parameters, the batches reshuffled each epoch; eval mode after."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for b in torch.randperm(len(data), generator=g).tolist():
            X, y = data[b]
            opt.zero_grad()
            loss_fn(answer_logits(model, X), y).backward()
            opt.step()
    model.eval()


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """The model frozen, with peft LoRA adapters of ``rank`` on its ``Conv1D`` layers."""
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["c_attn", "c_proj", "c_fc"],
        lora_dropout=0.0,
        fan_in_fan_out=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: fan_in_fan_out and Conv1D notices
        return peft.get_peft_model(model, config)


def metrics(probs: Tensor, y: Tensor) -> dict[str, float]:
    """Accuracy, NLL (mean) and ECE (``ECE_BINS`` equal-width bins of the confidence)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == y).double()
    bins = (confidence * ECE_BINS).long().clamp(max=ECE_BINS - 1)
    ece = sum(
        (correct[bins == k].mean() - confidence[bins == k].mean()).abs().item()
        * int((bins == k).sum())
        for k in range(ECE_BINS)
        if bool((bins == k).any())
    ) / len(y)
    nll = -probs.clamp_min(1e-12).log().gather(1, y[:, None]).mean().item()
    return {"accuracy": correct.mean().item(), "nll": nll, "ece": ece}


def evaluate(predict: Callable[[dict[str, Tensor]], Tensor], data: Sequence[Batch]) -> dict:
    """:func:`metrics` of ``predict``'s class probabilities over the batches."""
    probs = torch.cat([predict(X).double() for X, _ in data])
    return metrics(probs, torch.cat([y for _, y in data]))


def peak_rss_mib(fn: Callable[[], object]) -> float:
    """MiB of the peak resident set size during ``fn()`` above the one before it (Linux, glibc)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set size
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # KiB


def laplace(model: nn.Module, data: Sequence[Batch]) -> kronfac.Laplace:
    """The K-FAC Laplace approximation over the LoRA adapters."""
    return kronfac.Laplace(
        model, nn.CrossEntropyLoss(), data, modules=["lora"], forward=answer_logits
    )


def calibration(model: nn.Module, data: dict[str, list[Batch]]) -> kronfac.Laplace:
    """The MAP and both Laplace predictives on the test split (a table); returns ``la``."""
    train_data, val_data, test_data = data["finetune"], data["val"], data["test"]
    with torch.no_grad():
        rows = {"MAP": evaluate(lambda X: answer_logits(model, X).softmax(-1), test_data)}
    t0 = time.perf_counter()
    la = laplace(model, train_data)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    marglik = la.optimize_prior_precision()
    tuned = time.perf_counter() - t0
    rows[f"Laplace, marglik δ = {marglik:.3g}"] = evaluate(la.predictive, test_data)
    t0 = time.perf_counter()
    grid = la.optimize_prior_precision("gridsearch", val_data=val_data, grid=GRID)
    searched = time.perf_counter() - t0
    rows[f"Laplace, gridsearch δ = {grid:.3g}"] = evaluate(la.predictive, test_data)
    n_test = sum(len(y) for _, y in test_data)
    print(
        f"\nTest split ({n_test} digits): the MAP's softmax and the Laplace probit predictive "
        f"over the {la.num_params} LoRA parameters (K-FAC, {len(la.modules)} adapter layers)"
    )
    table = [
        [name, f"{m['accuracy']:.4f}", f"{m['nll']:.4f}", f"{m['ece']:.4f}"]
        for name, m in rows.items()
    ]
    print(format_table(["predictive", "accuracy", "NLL", "ECE (15 bins)"], table))
    print(
        f"la built in {built:.2f} s, marglik tuning {tuned:.2f} s, gridsearch "
        f"({len(val_data)} validation batches x {len(GRID)} values) {searched:.2f} s"
    )
    return la


def cost(model: nn.Module, la: kronfac.Laplace, data: dict[str, list[Batch]], rounds: int):
    """Time and peak memory of building ``la`` and of ``functional_variance`` (a table)."""
    train_data = data["finetune"]
    X, y = data["test"][0]
    loss_fn = nn.CrossEntropyLoss()

    def forward_backward() -> None:
        model.zero_grad()
        loss_fn(answer_logits(model, X), y).backward()

    fns = {
        "forward+backward": forward_backward,
        f"construct la ({len(train_data)} fine-tuning batches)": lambda: laplace(model, train_data),
        "la.functional_variance": lambda: la.functional_variance(X),
    }
    seconds = interleaved(fns, repeats=rounds)
    memory = {name: peak_rss_mib(fn) for name, fn in fns.items()}
    model.zero_grad()
    base_s, base_mib = seconds["forward+backward"], memory["forward+backward"]
    print(
        f"\nCost on a batch of {len(y)} test sequences ({rounds} interleaved rounds, median; "
        f"peak RSS above the one before the call)"
    )
    rows = [
        [
            name,
            f"{1e3 * seconds[name]:.1f}",
            f"{seconds[name] / base_s:.1f}",
            f"{memory[name]:.1f}",
            f"{memory[name] / base_mib:.1f}" if base_mib > 0 else "-",
        ]
        for name in fns
    ]
    print(format_table(["step", "ms", "x fwd+bwd", "peak MiB", "x fwd+bwd"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain", type=int, default=700, help="digits (default 700)")
    parser.add_argument("--finetune", type=int, default=200, help="digits (default 200)")
    parser.add_argument("--val", type=int, default=100, help="digits (default 100)")
    parser.add_argument("--test", type=int, default=400, help="digits (default 400)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--width", type=int, default=64, help="GPT-2's n_embd (default 64)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--base-epochs", type=int, default=20)
    parser.add_argument("--lora-epochs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    data = digit_batches(args)
    model = base_model(args)
    t0 = time.perf_counter()
    train(model, data["pretrain"], args.base_epochs, 3e-3, args.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    model = add_lora(model, args.rank)
    with torch.no_grad():
        base = evaluate(lambda X: answer_logits(model, X).softmax(-1), data["test"])
    train(model, data["finetune"], args.lora_epochs, 1e-2, args.seed + 1)
    print(
        f"base: {args.base_epochs} epochs, test accuracy {base['accuracy']:.4f}; LoRA (rank "
        f"{args.rank}): {args.lora_epochs} epochs; training {time.perf_counter() - t0:.1f} s"
    )
    la = calibration(model, data)
    cost(model, la, data, args.rounds)


if __name__ == "__main__":
    main()
