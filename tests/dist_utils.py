"""Runs a test function on several gloo ranks in spawned processes, with timeouts that never hang."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, world_size: int, args: tuple) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=30),
    )
    fn(rank, world_size, *args)
    # Leave together: a rank that tears down while its peer still talks to the store can abort.
    dist.barrier()
    dist.destroy_process_group()
    # A rank that passed leaves now. Interpreter teardown after DTensor use aborts now and then
    # ("terminate called without an active exception", no Python frame left): 3 of 60 runs of our
    # DTensor test, and 15 of 80 runs of a pure-torch DTensor program that never imports gradwatch
    # (torch 2.14.1, gloo). It would fail a test whose every assertion held. A failing rank never
    # gets here: spawn records its exception and exits non-zero as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, *args, world_size: int = 2, timeout: float = 90.0) -> None:
    """Runs ``fn(rank, world_size, *args)`` on every rank; re-raises a rank's failure; kills on timeout."""
    context = mp.start_processes(
        _entry, args=(fn, _free_port(), world_size, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"ranks did not finish within {timeout} s")
