"""torch.distributed helpers: single-process identities, and a 2-process gloo group checked against a
single-process computation of the same loss."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from sfm_lib import distributed


def test_single_process_is_the_identity():
    assert distributed.rank() == 0 and distributed.world_size() == 1 and distributed.is_main()
    t = torch.arange(5.0)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.arange(5.0))
    x = torch.randn(3, requires_grad=True)
    assert distributed.sum_replicated(x) is x
    assert torch.equal(distributed.shard(5), torch.arange(5))
    assert distributed.describe()["world_size"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("cpu")
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)     # the same on every rank
        w = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(True)
        rows = distributed.shard(len(x))                              # rank r: rows r, r + 2, ...
        partial = (x[rows] @ w).sum(0)                                # this rank's part of Σ_i x_i w
        total = distributed.sum_replicated(partial)
        loss = torch.tanh(total).pow(2).sum()                         # the same value on every rank
        loss.backward()
        distributed.all_reduce_sum(w.grad)
        out[rank] = (loss.detach(), w.grad.clone(), distributed.world_size(), distributed.is_main())
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_processes_equal_one():
    """Loss and (all-reduced) gradient of a sharded sum equal the single-process ones; rank 0 is main."""
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    loss = torch.tanh((x @ w).sum(0)).pow(2).sum()
    loss.backward()
    for rank in (0, 1):
        r_loss, r_grad, world, main = out[rank]
        assert world == 2 and main == (rank == 0)
        torch.testing.assert_close(r_loss, loss.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close(r_grad, w.grad, rtol=1e-12, atol=1e-15)
