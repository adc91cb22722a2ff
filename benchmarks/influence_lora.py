"""Influence on a LoRA-adapted GPT-2: top-influence training sequences, and the cost of scoring.

Task: next-byte prediction on the Python standard library's own source (``Lib/*.py``,
``kronfac.demo.stdlib_bytes``, the last 10% held out), windows of ``--context`` bytes.

1. Model: a 2-layer GPT-2 built from a ``GPT2Config`` (vocabulary 256, width ``--width``, 4
   heads, no dropout, eager attention; random weights, nothing downloaded), pretrained briefly
   (``--base-steps`` AdamW steps, lr 3e-3, batches of 32 random training windows), then frozen
   with peft LoRA adapters (rank ``--rank``, alpha twice that, on every ``Conv1D``: ``c_attn``,
   ``c_proj``, ``c_fc``; ``benchmarks/laplace_lora.py``'s ``add_lora``) fine-tuned by AdamW
   (lr 1e-2) for ``--lora-epochs`` epochs on ``--train`` training sequences (random windows of
   the training bytes, batches of ``--batch``).
2. ``kronfac.Influence`` (EKFAC, MC Fisher, default damping 0.1 × each block's mean eigenvalue)
   over the adapters (``modules=["lora"]``: every ``lora_A`` / ``lora_B`` Linear a block) from
   the training sequences; the loss of a sequence is its summed next-byte cross-entropy. The
   ``--queries`` queries: evenly spaced held-out windows. Printed: each query's first bytes and
   those of its 3 most helpful training sequences (highest ``score(q, t)``).
3. Cost of the ``--train`` × ``--queries`` scores, ``--rounds`` interleaved rounds after a
   warm-up round (``benchmarks/_common.py``), the median, beside the reference:

   - reference, *per-example gradient passes*: the ``--train`` + ``--queries`` per-example
     gradients of the adapters, one sequence at a time: forward, backward of its summed loss,
     the LoRA gradients flattened into one vector; the query vectors are kept and every
     training vector is dotted with them (the scores with ``H = I``, a negligible cost). The
     same with ``torch.func.vmap(grad)`` over batches of ``--batch`` sequences is the second,
     faster reference (``x vmap``);
   - ``inf.pairwise_scores(train, queries)`` with the curvature already fitted (one pass over
     the queries and one over the training batches);
   - fitting the curvature, ``kronfac.Influence(...)`` (K-FAC factors, eigendecompositions and
     the EKFAC corrections: two passes over the training batches);
   - the same two steps with kronfluence (``Analyzer.fit_all_factors``, EKFAC, and
     ``compute_pairwise_scores``, same batch sizes, ``cpu=True``, MC Fisher, the damping
     ``damping_factor=None``: 0.1 × each block's mean eigenvalue, as kronfac's; kronfluence's
     default is a fixed 1e-8), on a deep copy of the model (its
     ``prepare_model`` wraps the tracked modules), when kronfluence imports; it is never a
     dependency of kronfac (``pip install --no-deps kronfluence`` and its small pure-Python
     dependencies: a plain install pulls a CUDA torch). Its scores are compared with kronfac's
     (Spearman ρ over all pairs, and the top-3 overlap per query).

   Peak memory: the peak resident set size during the call above the one before it (Linux,
   glibc; ``laplace_lora.peak_rss_mib``): ``malloc_trim`` returns malloc's free memory to the
   system first, the high-water mark is reset through ``/proc/self/clear_refs`` and read with
   ``resource.getrusage`` (``ru_maxrss``). One call each, after the timings, in one process.

Usage::

    python benchmarks/influence_lora.py                 # the defaults: about 3 minutes, one core
    python benchmarks/influence_lora.py --train 200 --rounds 1 --base-steps 50 --no-kronfluence
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import io
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import transformers
from _common import interleaved, machine
from laplace_lora import add_lora, peak_rss_mib
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import kronfac
from kronfac.demo import format_table, stdlib_bytes

VOCAB = 256
Batch = tuple[Tensor, Tensor]  # ids [B, T], next bytes [B·T]


def logits(model: nn.Module, X: Tensor) -> Tensor:
    """The next-byte logits, flattened: ``[B·T, 256]``."""
    out: Tensor = model(X).logits
    return out.reshape(-1, VOCAB)


def windows(data: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Inputs ``[n, T]`` and next bytes ``[n, T]`` of the windows at ``starts``."""
    w = data[starts[:, None] + torch.arange(context + 1)].long()
    return w[:, :-1], w[:, 1:]


def batches(X: Tensor, Y: Tensor, size: int) -> list[Batch]:
    """``(ids [B, T], next bytes [B·T])`` in batches of ``size``."""
    return [(X[i : i + size], Y[i : i + size].reshape(-1)) for i in range(0, len(X), size)]


def build(args: argparse.Namespace, text: Tensor) -> nn.Module:
    """The GPT-2, pretrained briefly, then frozen with LoRA adapters (not trained yet)."""
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=args.context,
        n_embd=args.width,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",  # SDPA has no vmap batching rule on CPU
    )
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(text) - args.context - 1, (args.base_steps, 32), generator=g)
    fit(model, [windows(text, s, args.context) for s in starts], lr=3e-3)
    for p in model.parameters():
        p.requires_grad_(False)
    return add_lora(model, args.rank)


def fit(model: nn.Module, data: Sequence[tuple[Tensor, Tensor]], lr: float, epochs: int = 1):
    """AdamW (no weight decay) on the trainable parameters, mean next-byte loss; eval after."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr, weight_decay=0)
    model.train()
    for _ in range(epochs):
        for X, Y in data:
            opt.zero_grad()
            nn.functional.cross_entropy(logits(model, X), Y.reshape(-1)).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def mean_loss(model: nn.Module, data: Sequence[Batch]) -> float:
    """The mean next-byte loss over the batches."""
    total = sum(
        float(nn.functional.cross_entropy(logits(model, X), Y, reduction="sum")) for X, Y in data
    )
    return total / sum(len(Y) for _, Y in data)


def shown(ids: Tensor, n: int = 48) -> str:
    """The first ``n`` bytes of a sequence as a Python bytes literal."""
    return repr(bytes(ids[:n].tolist()))


# -- the reference: per-example gradients ---------------------------------------------------------


def lora_params(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loop_scores(model: nn.Module, train: Sequence[Batch], queries: Sequence[Batch]) -> Tensor:
    """Gradient dot products ``[n_q, n_t]`` from one forward+backward per sequence (reference)."""
    params = list(lora_params(model).values())

    def gradients(data: Sequence[Batch]):
        for X, Y in data:
            for x, y in zip(X, Y.view(len(X), -1), strict=True):
                loss = nn.functional.cross_entropy(logits(model, x[None]), y, reduction="sum")
                yield torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    Q = torch.stack(list(gradients(queries)))
    return torch.stack([Q @ g for g in gradients(train)], dim=1)


def vmap_scores(model: nn.Module, train: Sequence[Batch], queries: Sequence[Batch]) -> Tensor:
    """The same dot products, the gradients of each batch by ``torch.func.vmap(grad)``."""
    params = {n: p.detach() for n, p in lora_params(model).items()}

    def loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, p, (x[None],), strict=False).logits.reshape(-1, VOCAB)
        return nn.functional.cross_entropy(out, y, reduction="sum")

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))

    def gradients(X: Tensor, Y: Tensor) -> Tensor:
        g = per_example(params, X, Y.view(len(X), -1))
        return torch.cat([g[n].flatten(1) for n in params], dim=1)

    Q = torch.cat([gradients(*b) for b in queries])
    return torch.cat([Q @ gradients(*b).T for b in train], dim=1)


# -- kronfluence -----------------------------------------------------------------------------------


class Kronfluence:
    """kronfluence's EKFAC on a deep copy of the model: ``fit()`` then ``scores()``."""

    def __init__(self, model: nn.Module, train: Sequence[Batch], queries: Sequence[Batch]):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task

        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lora_" in n]

        class LMTask(Task):
            def compute_train_loss(self, batch, model, sample=False):
                X, Y = batch
                out = logits(model, X)
                if sample:  # the MC Fisher: labels drawn from the model
                    with torch.no_grad():
                        Y = torch.multinomial(out.softmax(-1), 1).flatten()
                return nn.functional.cross_entropy(out, Y.reshape(-1), reduction="sum")

            def compute_measurement(self, batch, model):
                return self.compute_train_loss(batch, model)

            def get_influence_tracked_modules(self):
                return names

            def get_attention_mask(self, batch):
                return None

        def dataset(data: Sequence[Batch]) -> torch.utils.data.TensorDataset:
            X = torch.cat([b[0] for b in data])
            return torch.utils.data.TensorDataset(
                X, torch.cat([b[1] for b in data]).view(len(X), -1)
            )

        self.copy = prepare_model(copy.deepcopy(model), LMTask())
        self.dir = tempfile.TemporaryDirectory()
        for name in ("kronfluence", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            self.analyzer = Analyzer(
                "lora", self.copy, LMTask(), cpu=True, disable_tqdm=True, output_dir=self.dir.name
            )
        self.train, self.queries = dataset(train), dataset(queries)
        self.batch, self.query_batch = len(train[0][0]), len(queries[0][0])
        self.factor_args = FactorArguments(strategy="ekfac")
        # kronfluence's default damping is a fixed 1e-8; None: its 0.1 x mean eigenvalue
        self.score_args = ScoreArguments(damping_factor=None)

    def fit(self) -> None:
        self.analyzer.fit_all_factors(
            "ekfac",
            self.train,
            per_device_batch_size=self.batch,
            factor_args=self.factor_args,
            overwrite_output_dir=True,
        )

    def scores(self) -> Tensor:
        self.analyzer.compute_pairwise_scores(
            "scores",
            "ekfac",
            self.queries,
            self.train,
            per_device_query_batch_size=self.query_batch,
            per_device_train_batch_size=self.batch,
            score_args=self.score_args,
            overwrite_output_dir=True,
        )
        scores = self.analyzer.load_pairwise_scores("scores")  # it returns None: saved to disk
        assert scores is not None
        return scores["all_modules"]


def kronfluence_or_reason(model, train, queries) -> Kronfluence | str:
    try:
        import kronfluence  # noqa: F401
    except ImportError as e:
        return (
            f"kronfluence not importable ({e}); 'pip install kronfluence' pulls a CUDA torch: "
            "pip install --no-deps kronfluence, then einops einconv opt-einsum accelerate"
        )
    return Kronfluence(model, train, queries)


# -- main ------------------------------------------------------------------------------------------


def top_influence(inf: kronfac.Influence, data: Data) -> Tensor:
    """Print each query's first bytes and its three most helpful training sequences'."""
    scores = inf.pairwise_scores(data.train, data.queries)
    assert isinstance(scores, Tensor)
    print(
        "\nTop-3 training sequences per query (score = ∇ℓ_qᵀ (H + δI)⁻¹ ∇ℓ_t, EKFAC; highest: "
        "upweighting it lowers the query's loss most); first bytes shown"
    )
    for q, row in enumerate(scores):
        top = row.topk(3)
        print(f"\nquery {q}: {shown(data.X_query[q])}")
        for value, t in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            print(f"  {value:+10.4g}  train {t:4d}: {shown(data.X_train[t])}")
    return scores


def spearman(a: Tensor, b: Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)


@dataclass
class Data:
    """The training sequences and the queries: ids ``[n, T]`` and their batches."""

    X_train: Tensor
    X_query: Tensor
    train: list[Batch]
    queries: list[Batch]
    about: str


def setup(args: argparse.Namespace) -> tuple[nn.Module, Data]:
    """The data and the trained LoRA model (a line on them printed)."""
    text = stdlib_bytes()
    split = len(text) - len(text) // 10
    train_text, held_out = text[:split], text[split:]
    g = torch.Generator().manual_seed(args.seed + 1)
    starts = torch.randint(0, len(train_text) - args.context - 1, (args.train,), generator=g)
    X_train, Y_train = windows(train_text, starts, args.context)
    last = len(held_out) - args.context - 1
    X_query, Y_query = windows(held_out, torch.linspace(0, last, args.queries).long(), args.context)
    data = Data(
        X_train,
        X_query,
        batches(X_train, Y_train, args.batch),
        [(X_query, Y_query.reshape(-1))],
        f"Lib/*.py bytes: {len(train_text):,} training, {len(held_out):,} held out; "
        f"{args.train} training sequences and {args.queries} held-out queries of "
        f"{args.context} bytes",
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notices
        model = build(args, train_text)
    base = mean_loss(model, data.queries)
    g = torch.Generator().manual_seed(args.seed + 2)
    for _ in range(args.lora_epochs):
        o = torch.randperm(args.train, generator=g)
        fit(model, batches(X_train[o], Y_train[o], args.batch), lr=1e-2)
    lora = sum(p.numel() for p in lora_params(model).values())
    print(
        f"\n{data.about}; GPT-2 (2 layers, width {args.width}) pretrained {args.base_steps} "
        f"steps, LoRA rank {args.rank} ({lora:,} parameters) {args.lora_epochs} epochs: query "
        f"loss {base:.3f} -> {mean_loss(model, data.queries):.3f} nats/byte; training "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return model, data


def cost(model: nn.Module, data: Data, args: argparse.Namespace, ours: Tensor) -> None:
    """Time and peak memory of the scores against the per-example gradient passes (tables)."""
    train, queries = data.train, data.queries

    def influence() -> kronfac.Influence:
        return kronfac.Influence(
            model, nn.CrossEntropyLoss(), train, modules=["lora"], forward=logits
        )

    inf = influence()
    n, q = args.train, args.queries
    fns: dict[str, Callable[[], object]] = {
        f"per-example gradients, loop ({n} + {q} fwd+bwd of 1)": lambda: loop_scores(
            model, train, queries
        ),
        f"per-example gradients, vmap (batches of {args.batch})": lambda: vmap_scores(
            model, train, queries
        ),
        f"kronfac pairwise_scores ({n} x {q})": lambda: inf.pairwise_scores(train, queries),
        f"kronfac Influence(...) fit, EKFAC ({len(train)} batches)": influence,
    }
    other = None if args.no_kronfluence else kronfluence_or_reason(model, train, queries)
    if isinstance(other, Kronfluence):
        fns["kronfluence fit_all_factors, EKFAC"] = other.fit  # first: the scores read them
        fns[f"kronfluence compute_pairwise_scores ({n} x {q})"] = other.scores
    reference = loop_scores(model, train, queries)  # the references agree
    torch.testing.assert_close(vmap_scores(model, train, queries), reference, rtol=1e-3, atol=1e-3)
    seconds = interleaved(fns, repeats=args.rounds)
    memory = {name: peak_rss_mib(fn) for name, fn in fns.items()}
    names = list(fns)
    loop_s, vmap_s, scoring, fitting = (seconds[k] for k in names[:4])
    rows = [
        [
            name,
            f"{seconds[name]:.2f}",
            f"{seconds[name] / loop_s:.2f}",
            f"{seconds[name] / vmap_s:.2f}",
            f"{memory[name]:.1f}",
        ]
        for name in names
    ]
    print(
        f"\nCost of {n} train x {q} query scores (LoRA adapters, {len(inf.modules)} blocks; "
        f"{args.rounds} interleaved rounds after a warm-up, median; peak RSS above the one "
        f"before the call, one call each)"
    )
    print(format_table(["step", "s", "x loop", "x vmap", "peak MiB"], rows))
    print(
        f"\nkronfac scoring / per-example gradient passes: {scoring / loop_s:.2f}x the loop, "
        f"{scoring / vmap_s:.2f}x vmap (target <= 2); fit + scoring: "
        f"{(scoring + fitting) / loop_s:.2f}x the loop, {(scoring + fitting) / vmap_s:.2f}x vmap"
    )
    if not isinstance(other, Kronfluence):
        print("kronfluence: left out (--no-kronfluence)" if other is None else other)
        return
    theirs = other.scores()
    overlap = statistics.mean(
        len(set(a.topk(3).indices.tolist()) & set(b.topk(3).indices.tolist())) / 3
        for a, b in zip(ours, theirs, strict=True)
    )
    print(
        f"kronfluence {importlib.metadata.version('kronfluence')} / kronfac: fit "
        f"{seconds[names[4]] / fitting:.2f}x, scoring "
        f"{seconds[names[5]] / scoring:.2f}x. Scores, Spearman ρ over all pairs: kronfac with "
        f"kronfluence {spearman(ours, theirs):.3f}, with the gradient dot products (H = I) "
        f"{spearman(ours, reference):.3f}, kronfluence with them "
        f"{spearman(theirs, reference):.3f}; top-3 overlap kronfac / kronfluence {overlap:.2f} "
        "(mean over the queries)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=1000, help="training sequences (1000)")
    parser.add_argument("--queries", type=int, default=10, help="query sequences (10)")
    parser.add_argument("--context", type=int, default=64, help="bytes per sequence (64)")
    parser.add_argument("--width", type=int, default=64, help="GPT-2's n_embd (default 64)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--batch", type=int, default=50, help="sequences per batch (50)")
    parser.add_argument("--base-steps", type=int, default=300, help="pretraining steps (300)")
    parser.add_argument("--lora-epochs", type=int, default=3, help="LoRA epochs (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (3)")
    parser.add_argument("--no-kronfluence", action="store_true", help="leave kronfluence out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
    print(machine())
    start = time.perf_counter()
    model, data = setup(args)
    inf = kronfac.Influence(
        model, nn.CrossEntropyLoss(), data.train, modules=["lora"], forward=logits
    )
    ours = top_influence(inf, data)
    cost(model, data, args, ours)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
