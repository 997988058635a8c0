"""Data-parallel calibration over ``torch.distributed``.

Gram sums are additive over tokens, so under ``torchrun`` (or any launcher
that sets RANK / WORLD_SIZE) each rank takes a disjoint shard of every
expert's calibration batches, accumulates partial sums, and one all-reduce
per shared input adds them up before the solve. Every rank then holds the
same statistics, solves the same merge and pushes the same merged weights
through its own shard, so the chain stays identical everywhere; only rank 0
writes the output.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from mergekit_com.errors import ChainConfigError

LOG = logging.getLogger(__name__)
T = TypeVar("T")


def cpu_threads(requested: Optional[int]) -> int:
    """Threads for this process: ``requested`` (``--num-threads``) if given, else torch's
    current setting (which honours ``OMP_NUM_THREADS``), at most this machine's cores
    shared among the ranks a launcher started on it, so ranks never oversubscribe."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(torch.get_num_threads(), (cores or 1) // local_ranks))


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> None:
    """Join the process group a launcher described in the environment (once)."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    LOG.info("rank %d/%d joined (%s)", rank(), world_size(), backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", "1"))


def is_writer() -> bool:
    """Rank 0 writes; any other rank only contributes statistics."""
    return rank() == 0


def shard(items: Sequence[T], what: str) -> List[T]:
    """This rank's disjoint share (round-robin) of ``items``."""
    n = world_size()
    if n == 1:
        return list(items)
    if len(items) < n:
        raise ChainConfigError(f"{what} has {len(items)} batches, fewer than the {n} ranks; "
                               "use more samples, a smaller batch_size or fewer ranks")
    return list(items[rank()::n])


def all_reduce_moments(moments: Iterable) -> None:
    """Sum every rank's partial ``linalg.Moments`` in place (one call per solve)."""
    if not active():
        return
    for m in moments:
        if m.folds is not None:  # a held-out pair: its totals are summed from the folds later
            all_reduce_moments(m.folds)
            device = m.folds[0].gram.device
        else:
            if m.gram is None:
                raise ValueError("a rank saw no calibration tokens at this layer")
            all_reduce_sum(m.gram)
            for moment in (m.cross, m.cross_diag, *(m.outputs or {}).values()):
                if moment is not None:
                    all_reduce_sum(moment)
            device = m.gram.device
        count = torch.tensor([float(m.count), float(m.sequences), m.spread], dtype=torch.float64,
                             device=device)
        all_reduce_sum(count)
        m.count, m.sequences, m.spread = int(count[0].item()), int(count[1].item()), float(count[2].item())


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over ranks in place (a no-op in one process)."""
    if active():
        dist.all_reduce(tensor)


def from_writer(value: bool, device: torch.device) -> bool:
    """Rank 0's ``value`` on every rank (the others' is ignored; in one process, ``value``)."""
    if not active():
        return value
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest ``value`` any rank holds (e.g. checkpointed layers each rank can read)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
