"""Gloo worker processes on 127.0.0.1, for the distributed tests (tests/test_distributed.py) and benchmark
(benchmarks/bench_distributed.py): one home for the port, the process start and the group set-up."""

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_workers(entry, *args, world: int, join: bool):
    """``entry(rank, port, *args)`` in ``world`` fresh (spawned) processes, ``port`` a free one for
    :func:`init_gloo`; returns torch.multiprocessing's context (joined already when ``join``)."""
    return mp.start_processes(entry, args=(free_port(), *args), nprocs=world, join=join, start_method="spawn")


def init_gloo(rank: int, port: int, world: int, *, timeout_s: float) -> None:
    """Join the gloo group of ``world`` ranks at 127.0.0.1:``port``, on the loopback device, 1 thread a rank."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
