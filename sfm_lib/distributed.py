"""Multi-process runs under ``torchrun`` (torch.distributed): rank, world size, device, collectives.

Launch the command line with torchrun, never with a launcher of our own::

    torchrun --nproc_per_node=8 -m sfm_lib stats ...      # NCCL on GPUs
    torchrun --nproc_per_node=2 -m sfm_lib distill ...    # gloo on the CPU

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init` joins the process group from them (NCCL when CUDA is there, else gloo). Without them
every function here is the single-process identity: rank 0 of a world of size 1.

:mod:`sfm_lib.stats`, :mod:`sfm_lib.distill` and :mod:`sfm_lib.objectives` use this module, and
:func:`sfm_lib.cli.main` calls :func:`init` and :func:`finish` for ``stats`` and ``distill``. Work is split
in contiguous blocks (:func:`block`: statistics by items, distillation by classes). Three collectives matter:

- :func:`all_reduce_sum` sums a tensor over ranks in place (statistics: per-class sums and counts).
- :func:`sum_replicated` sums per-rank partial results **inside an autograd graph** whose loss is then
  computed identically on every rank. Its backward is the identity: if S = Σ_r s_r and every rank
  computes the same L(S), then ∂L/∂s_r = ∂L/∂S on rank r. (``torch.distributed.nn.all_reduce`` would
  all-reduce the gradient as well, which is right for a loss *summed* over ranks, and here would
  multiply the gradient by the world size.)
- :func:`gather_rows` puts every rank's block of rows together (distillation: each rank owns the images and
  Adam state of its block of classes; they are gathered for a checkpoint and at the end, never per step).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from .utils import resolve_device

__all__ = ["init", "finish", "launched", "is_active", "rank", "world_size", "is_main", "device", "all_reduce_sum",
           "sum_replicated", "gather_rows", "shard", "block", "barrier", "describe"]


def launched() -> bool:
    """True when torchrun started this process (``TORCHELASTIC_RUN_ID`` set, also for one process, so that
    ``--nproc_per_node=1`` joins a real NCCL/gloo group), or when ``WORLD_SIZE`` > 1."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


_launched = launched


def is_active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(device: str | torch.device = "auto") -> torch.device:
    """Join the process group that torchrun describes (no-op without torchrun) and return this rank's
    device: ``cuda:LOCAL_RANK`` when CUDA is used, else the device ``device`` resolves to."""
    if _launched() and not (dist.is_available() and dist.is_initialized()):
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return this_device(device)


def finish() -> None:
    """Leave the process group (no-op without one): the end of a torchrun command."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def this_device(device: str | torch.device = "auto") -> torch.device:
    """``device`` resolved, with the CUDA index taken from ``LOCAL_RANK`` under torchrun."""
    dev = resolve_device(device)
    if dev.type == "cuda" and _launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


device = this_device


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0: the only process that writes files and prints progress."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_active():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Σ over ranks, in place (no-op in a single process); returns ``tensor``. Not differentiable."""
    if is_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class _SumReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return grad


def sum_replicated(tensor: torch.Tensor) -> torch.Tensor:
    """S = Σ_r s_r, differentiable, for a loss that every rank then computes identically from S:
    the backward passes ∂L/∂S through unchanged (see the module doc). Identity in a single process."""
    return _SumReplicated.apply(tensor) if is_active() else tensor


def gather_rows(part: torch.Tensor, counts: Sequence[int], dst: int | None = None) -> torch.Tensor | None:
    """[Σ_r counts[r], …] on the CPU: the rows of ranks 0 … W−1 in order, rank r holding ``counts[r]`` of them
    (``part`` here). ``dst`` None: every rank gets them (one broadcast per rank); ``dst`` = d: only rank d
    (one send per other rank), the others get None. Either way a device holds one rank's block at a time.
    Not differentiable; ``part`` detached, on the CPU, in a single process."""
    if len(counts) != world_size():
        raise ValueError(f"{len(counts)} row counts for {world_size()} ranks")
    if part.shape[0] != counts[rank()]:
        raise ValueError(f"rank {rank()} holds {part.shape[0]} rows, its count is {counts[rank()]}")
    if not is_active():
        return part.detach().cpu()
    me, part = rank(), part.detach().contiguous()
    if dst is not None and me != dst:
        dist.send(part, dst)
        return None
    out = []
    for r, n in enumerate(counts):
        buf = part if r == me else part.new_empty((n, *part.shape[1:]))
        if dst is None:
            dist.broadcast(buf, src=r)
        elif r != me:
            dist.recv(buf, src=r)
        out.append(buf.cpu())
    return torch.cat(out)


def shard(n: int) -> torch.Tensor:
    """Indices of items 0 … n−1 that this rank handles: r, r + W, r + 2W, … (all of them without torchrun)."""
    return torch.arange(rank(), n, world_size())


def block(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """This rank's contiguous block ``[lo, hi)`` of items 0 … n−1: lo = ⌊r·n/W⌋, hi = ⌊(r+1)·n/W⌋ (the blocks
    of ranks 0 … W−1 tile 0 … n−1 in order; ``(0, n)`` without torchrun)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return r * n // w, (r + 1) * n // w


def describe() -> dict:
    """``{"world_size": W, "backend": ...}`` for metadata."""
    return {"world_size": world_size(), "backend": dist.get_backend() if is_active() else None}


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
