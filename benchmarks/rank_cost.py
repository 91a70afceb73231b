"""``python -m benchmarks.rank_cost``: what rank attribution adds to a DDP training step.

Two gloo ranks on the CPU (spawned), one process each with one thread. Each rank builds five DDP
copies of the same 8-layer MLP (512 wide, ~2.1M parameters, 25 MB buckets as DDP's default):

* ``ddp``: plain DDP, no monitor;
* ``watch``: DDP + ``GradWatch`` (today's check, policy skip);
* ``pyhook``: ``watch`` with torch's own Python ``allreduce_hook`` registered (what any Python
  communication hook costs over DDP's built-in C++ reduction, before measuring anything);
* ``rank``: DDP + ``GradWatch`` + ``attribute_ranks`` (the hook's fused pass per bucket, one
  all-gather per step);
* ``rank+replica``: the same with ``replica_check_every=1`` (the replica checksum every step; its
  real cost is this divided by K).

A training step (forward, backward with DDP's all-reduce, ``optimizer.step()`` with the check) is
timed round-robin over the five, so load from other processes falls on all of them alike; the
median per configuration and the ratios are printed by rank 0, with the mean time per step spent
in the attribution's parts (the hook's measuring, its check, the all-gather inside the check) and,
for scale, in the monitor's own agree all-reduce of the same step. Options: ``--steps N`` (timed steps
per configuration, default 60), ``--width W``, ``--depth D``, ``--batch B``.
"""

from __future__ import annotations

import argparse
import copy
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = ("ddp", "watch", "pyhook", "rank", "rank+replica")
PARTS = ("hook: measure", "check", "check: all-gather", "monitor's agree")


def _body(rank: int, world: int, steps: int, width: int, depth: int, batch: int) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    torch.manual_seed(0)
    layers = [m for _ in range(depth) for m in (torch.nn.Linear(width, width), torch.nn.ReLU())]
    base = torch.nn.Sequential(*layers[:-1])
    runs = {}
    for name in CONFIGS:
        model = DistributedDataParallel(copy.deepcopy(base))
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        watch = None
        if name != "ddp":
            watch = gradwatch.GradWatch(model.module, opt, policy="skip", log_rank=None)
        if name == "pyhook":
            model.register_comm_hook(None, allreduce_hook)
        if name.startswith("rank"):
            gradwatch.attribute_ranks(model, watch, replica_check_every=1 if "replica" in name else None)
        runs[name] = (model, opt, watch)
    # Parts, timed inside the "rank" copy: the hook's measuring, the attribution's check and, within
    # it, its all-gather; and the monitor's own agree (a tiny all-reduce) for scale.
    import gradwatch.monitor
    import gradwatch.rank_attribution

    spent = dict.fromkeys(PARTS, 0.0)
    current = [""]

    def timed(owner: object, method: str, part: str) -> None:
        original = getattr(owner, method)

        def wrapper(*a, **k):
            t = time.perf_counter()
            out = original(*a, **k)
            if current[0] == "rank":
                spent[part] += time.perf_counter() - t
            return out

        setattr(owner, method, wrapper)

    attribution = runs["rank"][2]._rank_attribution
    timed(attribution, "_measure", "hook: measure")
    timed(attribution, "check", "check")
    timed(gradwatch.rank_attribution, "_all_gather", "check: all-gather")
    timed(gradwatch.monitor, "agree", "monitor's agree")
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for i in range(steps + 5):  # the first 5 rounds warm up (DDP rebuilds its buckets after step 0)
        for name in CONFIGS:
            model, opt, _ = runs[name]
            current[0] = name
            dist.barrier()
            t = time.perf_counter()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            elapsed = time.perf_counter() - t
            if i >= 5:
                times[name].append(elapsed)
            if i == 4 and name == "rank":  # warm-up over: count from here
                spent.update(dict.fromkeys(PARTS, 0.0))
    for _, _, watch in runs.values():
        if watch is not None:
            watch.flush()
            assert not watch.events, watch.events  # healthy run: nothing to report
    medians = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    medians.update({part: t / steps * 1e3 for part, t in spent.items()})  # means
    gathered = [None] * world
    dist.all_gather_object(gathered, medians)
    if rank == 0:
        n = sum(p.numel() for p in base.parameters())
        print(f"{world} gloo ranks, 1 thread each, MLP {depth}x{width} ({n / 1e6:.1f}M params), batch {batch}")
        print(f"median ms per training step over {steps} round-robin steps (rank 0 / rank 1):")
        for name in CONFIGS:
            print(f"  {name:<13} " + " / ".join(f"{m[name]:8.2f}" for m in gathered))
        print("mean ms per step spent in parts of the 'rank' copy:")
        for part in PARTS:
            print(f"  {part:<18} " + " / ".join(f"{r[part]:8.2f}" for r in gathered))
        m = {name: max(r[name] for r in gathered) for name in CONFIGS}  # a step lasts as long as its slowest rank
        print(f"rank / watch        = {m['rank'] / m['watch']:.3f}")
        print(f"rank / pyhook       = {m['rank'] / m['pyhook']:.3f}  (pyhook / watch = {m['pyhook'] / m['watch']:.3f})")
        print(f"rank / ddp          = {m['rank'] / m['ddp']:.3f}  (watch / ddp = {m['watch'] / m['ddp']:.3f})")
        print(f"rank+replica / rank = {m['rank+replica'] / m['rank']:.3f}  (replica check every step)")


def _entry(rank: int, port: int, world: int, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _body(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    world = 2
    mp.spawn(_entry, args=(port, world, (args.steps, args.width, args.depth, args.batch)), nprocs=world)


if __name__ == "__main__":
    main()
