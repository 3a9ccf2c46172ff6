"""Data-parallel calibration over `torch.distributed`: every rank is given the same calibration windows, streams
its share of the batches, and the statistics are summed with `all_reduce` before anyone reads them, so every rank
computes the same bases, factors and weights (and rank 0 can save the model).

Outside a process group (the usual case) every function here is the identity. Run a recipe under `torchrun
--nproc-per-node N` with `torch.distributed.init_process_group("nccl")` (GPUs) or `"gloo"` (CPUs) first.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from fxslice.core.errors import BadInput

__all__ = ["rank_and_size", "barrier", "shard", "all_reduce_observers", "all_reduce_sum", "launched_group"]

T = TypeVar("T")


@contextmanager
def launched_group(device: str = "cpu") -> Iterator[None]:
    """The process group `torchrun` launched this process into (`WORLD_SIZE` > 1 in its environment), joined for the
    duration: NCCL with each rank on its `LOCAL_RANK`'s GPU when computing on CUDA, gloo otherwise. Outside torchrun,
    or where the caller has joined a group already, it does nothing."""
    import torch.distributed as dist

    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    cuda = device != "cpu" and device != "mps" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for without a process group)."""
    import torch.distributed as dist

    if rank_and_size()[1] > 1:
        dist.barrier()


def _fingerprint(batches: Sequence[torch.Tensor]) -> int:
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(str((tuple(batch.shape), str(batch.dtype))).encode())
        digest.update(batch.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest()[:7], "little")  # fits an int64


def shard(batches: Sequence[T]) -> list[T]:
    """This rank's share of `batches` (every size-th, from its rank). Every rank must have been given the same
    batches: a rank with other data would make every rank's statistics wrong, so all ranks check it together and
    all raise the same error (never a hang, never a silently wrong model)."""
    rank, size = rank_and_size()
    if size == 1:
        return list(batches)
    import torch.distributed as dist

    mine = torch.tensor([len(batches), _fingerprint(batches)], dtype=torch.int64)  # type: ignore[arg-type]
    seen = [torch.zeros_like(mine) for _ in range(size)]
    dist.all_gather(seen, mine)
    if any(not torch.equal(s, seen[0]) for s in seen):
        counts = [int(s[0]) for s in seen]
        raise BadInput(f"the {size} ranks were given different calibration data (batches per rank: {counts}); give "
                       "every rank the same windows: each one takes its own share of them")
    if len(batches) < size:
        raise BadInput(f"{len(batches)} calibration batch(es) cannot be shared by {size} ranks: use more windows, a "
                       "smaller batch size or fewer ranks")
    return list(batches[rank::size])


def all_reduce_sum(values: Iterable[float]) -> list[float]:
    """Sum plain numbers over the ranks (float64)."""
    values = list(values)
    _, size = rank_and_size()
    if size == 1:
        return values
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def all_reduce_observers(observers: Iterable[Any]) -> None:
    """Sum every observer's statistic over the ranks (those that have one: `all_reduce()`), in a fixed order."""
    if rank_and_size()[1] == 1:
        return
    for watching in observers:
        for observer in (watching if isinstance(watching, Sequence) else (watching,)):
            reduce = getattr(observer, "all_reduce", None)
            if reduce is not None:
                reduce()
