r"""torch.distributed for the engine: each rank's data is its shard of one dataset.

When the default process group is initialised with more than one rank (or a group is passed
as ``process_group=``), a pass over the data sums its factor sums and counts over the ranks
before the scale rule divides them: every rank ends with the factors of one process on the
union of the shards. Nothing here has its own transport — torch.distributed's collectives on
the group (gloo on CPU, NCCL on GPUs), launched by ``torchrun`` or ``torch.multiprocessing``.

**What is communicated** per pass, after the local pass ends: one all-reduce of one flag (did
every rank's pass succeed?), one of the counts, and one bucketed all-reduce of every module's
sums, one flat buffer per dtype, in which a symmetric sum (``Σ a aᵀ``, ``Σ g gᵀ``) travels as
its upper triangle only (``d(d + 1)/2`` numbers instead of ``d²``): :func:`all_reduce_sums`.

**Failures.** A rank whose pass raises (bad input, empty shard) still joins the flag's
all-reduce, then raises its own error; the other ranks raise a ``RuntimeError`` naming the
ranks that failed, instead of waiting in the next collective. A rank that dies or hangs
outside kronfac is caught by the process group's ``timeout`` (``init_process_group(...,
timeout=timedelta(...))``; torch's default is 10 minutes for gloo), after which the
collective raises on the other ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "agree",
    "all_reduce_counts",
    "all_reduce_sums",
    "group_of",
    "rank_of",
]


def group_of(process_group: Any = None) -> Any:
    """The group a pass communicates over, or ``None`` for a single process.

    ``process_group`` when given (a ``torch.distributed.ProcessGroup``); otherwise the default
    group when torch.distributed is initialised with more than one rank.
    """
    if process_group is not None:
        return process_group
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def rank_of(group: Any) -> int:
    """This process's rank in ``group`` (0 without one)."""
    return 0 if group is None else torch.distributed.get_rank(group)


def _device(group: Any) -> torch.device:
    """Where the group's collectives take tensors: CUDA for NCCL, the CPU otherwise."""
    backend = torch.distributed.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(group: Any, error: BaseException | None, what: str) -> None:
    """Every rank learns whether every rank's ``what`` succeeded; all raise if one did not.

    Raises:
        BaseException: ``error`` itself on the rank that failed.
        RuntimeError: On the other ranks, naming the ranks that failed.
    """
    world = torch.distributed.get_world_size(group)
    failed = torch.zeros(world, dtype=torch.int64, device=_device(group))
    failed[rank_of(group)] = error is not None
    torch.distributed.all_reduce(failed, group=group)
    if error is not None:
        raise error
    if bool(failed.any()):
        ranks = failed.nonzero().reshape(-1).tolist()
        raise RuntimeError(
            f"{what} failed on rank(s) {ranks} of {world} (see their errors); every rank stops "
            "here instead of waiting in a collective."
        )


def all_reduce_counts(values: Sequence[int], group: Any, op: str = "sum") -> list[int]:
    """``values`` summed (``op="sum"``) or maximised (``"max"``) over the ranks."""
    t = torch.tensor(list(values), dtype=torch.int64, device=_device(group))
    reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(t, op=reduce_op, group=group)
    return [int(v) for v in t.tolist()]


def all_reduce_sums(tensors: Sequence[Tensor], symmetric: Sequence[bool], group: Any) -> int:
    """Sum ``tensors`` over the ranks in place, in one all-reduce per dtype.

    A ``symmetric`` tensor ``[..., d, d]`` travels as its upper triangle (diagonal included),
    and only its upper triangle is written back: the engine's Gram sums are complete there
    (:func:`~kronfac.linalg.accumulate_gram`) and symmetrised when read.

    Args:
        tensors: The sums, each of the same shape and dtype on every rank.
        symmetric: Per tensor, whether only its upper triangle counts.
        group: The process group.

    Returns:
        The bytes this rank sent into the all-reduces (the payload, before the backend's own
        traffic).
    """
    device = _device(group)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    sent = 0
    for indices in by_dtype.values():
        parts = [_pack(tensors[i], symmetric[i]) for i in indices]
        flat = torch.cat([p.reshape(-1) for p in parts]).to(device)
        torch.distributed.all_reduce(flat, group=group)
        sent += flat.numel() * flat.element_size()
        offset = 0
        for i, part in zip(indices, parts, strict=True):
            chunk = flat[offset : offset + part.numel()].to(tensors[i].device)
            _unpack(tensors[i], chunk, symmetric[i])
            offset += part.numel()
    return sent


def _pack(t: Tensor, symmetric: bool) -> Tensor:
    """``t`` flat, or the upper triangles of its ``[..., d, d]`` matrices."""
    if not symmetric or t.ndim < 2 or t.shape[-1] == 0:
        return t.reshape(-1)
    rows, cols = torch.triu_indices(t.shape[-1], t.shape[-1], device=t.device)
    return t[..., rows, cols].reshape(-1)


def _unpack(t: Tensor, flat: Tensor, symmetric: bool) -> None:
    """Write the reduced ``flat`` back into ``t`` (its upper triangles, if ``symmetric``)."""
    if not symmetric or t.ndim < 2 or t.shape[-1] == 0:
        t.copy_(flat.reshape(t.shape))
        return
    rows, cols = torch.triu_indices(t.shape[-1], t.shape[-1], device=t.device)
    t[..., rows, cols] = flat.reshape(*t.shape[:-2], -1)
