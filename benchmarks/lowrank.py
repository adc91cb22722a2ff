"""Low-rank vs full-rank factors on an LLM-sized model (issue 5).

A ``LlamaForCausalLM`` (hidden 1024, intermediate 2752, 4 layers, 8 heads, vocab 1000, random
weights) with peft LoRA adapters (r = 8 on q_proj and v_proj), 16 sequences of 128 tokens in
batches of 8, token-level cross-entropy, fisher "mc":

- time of ``compute_factors`` on the LoRA adapters and on the base Linear layers, full rank and
  ``rank=16`` (threshold 512), as ratios to BASE (forward + backward), interleaved in one
  process, median of ``--repeats`` runs after a warm-up;
- peak memory of each configuration, each in a fresh child process: the peak resident set
  (``VmHWM``, reset through ``/proc/self/clear_refs`` after building the model) over the
  model's own footprint (activations and gradients included). Linux only.

    python benchmarks/lowrank.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import warnings

import torch
from _common import interleaved, machine, setup_threads
from torch import nn

import kronfac

CONFIGS = {
    "LoRA adapters, full rank": {"modules": ["lora_"]},
    "LoRA adapters, rank 16": {"modules": ["lora_"], "rank": 16},
    "base Linear layers, full rank": {"modules": ["base_layer", "o_proj", "mlp."]},
    "base Linear layers, rank 16": {"modules": ["base_layer", "o_proj", "mlp."], "rank": 16},
}


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


def child(name: str) -> None:
    """Measure one configuration's peak memory increase in this (fresh) process."""
    setup_threads()
    model, data = build()
    gc.collect()
    before = reset_peak()  # the model's own footprint; no pass has run in this process
    if name == "BASE":
        base_pass(model, data)
    else:
        factors(model, data, CONFIGS[name])
    print(json.dumps({"name": name, "increase_mib": peak_mib() - before}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    setup_threads()
    model, data = build()
    fns = {"BASE (forward+backward)": lambda: base_pass(model, data)}
    for name, options in CONFIGS.items():
        fns[name] = lambda o=options: factors(model, data, o)
    medians = interleaved(fns, args.repeats)
    memory = {}
    for name in ["BASE", *CONFIGS]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", name],
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
