"""``python -m benchmarks.origin_cost [--quick] [--rounds N]``: what issue 16's origin and ratio features cost.

Whole training steps (forward, backward, optimizer step, the monitor's hooks), one process, the
variants interleaved round-robin so that they share the machine's state; medians per variant:

* ``plain``: no monitor.
* ``check``: ``GradWatch(model, opt)``: today's check, with the backward-order learning of
  ``nonfinite_origin`` (on by default: hooks during one backward pass in 500).
* ``check, origin=False``: the same without it.
* ``forward_check``: ``GradWatch(..., forward_check=True)``: a reduction per module call.
* ``update_ratio_every=1``: parameter snapshot and fused update norms every step.
* ``detect_anomaly``: plain training under ``torch.autograd.detect_anomaly()``, no monitor.

Printed per variant: median step time, the ratio to ``plain``, and the added time as a ratio to
the added time of ``check`` ("cost as a ratio to today's check"). Then the monitoring work alone,
timed directly (less noisy than step differences): one check (``watch.check()``, as the optimizer
pre-hook runs it) against one update-ratio measurement (the snapshot plus the fused norms).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

import gradwatch
from benchmarks.workloads import Workload, build_workload
from gradwatch.update_ratio import UpdateRatios

VARIANTS: dict[str, dict | None] = {
    "plain": None,
    "check": {},
    "check, origin=False": {"origin": False},
    "forward_check": {"forward_check": True},
    "update_ratio_every=1": {"update_ratio_every": 1},
    "detect_anomaly": None,
}


def _step(w: Workload, i: int) -> None:
    batch = w.batches[i % len(w.batches)]
    loss = w.loss_fn(w.model, batch)
    loss.backward()
    w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=True)


def _sync(w: Workload) -> None:
    if w.device.type == "cuda":
        torch.cuda.synchronize(w.device)


def _timed(w: Workload, steps: int, start: int, context: Callable[[], object]) -> list[float]:
    times = []
    with context():  # type: ignore[attr-defined]
        for i in range(steps):
            _sync(w)
            t = time.perf_counter()
            _step(w, start + i)
            _sync(w)
            times.append(time.perf_counter() - t)
    return times


def run(name: str, device: torch.device, quick: bool, rounds: int, steps: int) -> dict[str, float]:
    w = build_workload(name, device, quick=quick)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    counter = 0
    for _ in range(2):  # warm-up: allocator, kernels, first-step optimizer state
        _step(w, counter)
        counter += 1
    for _ in range(rounds):
        for variant, options in VARIANTS.items():
            watch = None
            if options is not None:
                watch = gradwatch.GradWatch(w.model, w.optimizer, policy="warn", **options)
                _step(w, counter)  # its first step (allocations, the first backward order)
                counter += 1
            context = torch.autograd.detect_anomaly if variant == "detect_anomaly" else nullcontext
            times[variant] += _timed(w, steps, counter, context)
            counter += steps
            if watch is not None:
                watch.remove()
    return {v: statistics.median(t) for v, t in times.items()}


def work_alone(name: str, device: torch.device, quick: bool, calls: int) -> tuple[float, float]:
    """Median ms of one full check and of one update-ratio measurement (snapshot + fused norms), interleaved."""
    w = build_workload(name, device, quick=quick)
    w.loss_fn(w.model, w.batches[0]).backward()
    watch = gradwatch.GradWatch(w.model, w.optimizer, policy="warn", attach=False)
    ratios = UpdateRatios(watch._params)  # what update_ratio_every=N runs on a measured step
    no_skip = torch.zeros((), dtype=torch.bool, device=device)
    checks, measured = [], []
    for i in range(calls + 5):
        _sync(w)
        t = time.perf_counter()
        watch.check()
        _sync(w)
        t_check = time.perf_counter() - t
        t = time.perf_counter()
        ratios.snapshot()
        ratios.put(i, ratios.measure(), no_skip)
        _sync(w)
        t_ratio = time.perf_counter() - t
        ratios.take(i)
        watch.flush()
        if i >= 5:
            checks.append(t_check)
            measured.append(t_ratio)
    watch.remove()
    return statistics.median(checks) * 1e3, statistics.median(measured) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CI smoke sizes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--workloads", default="resnet50,gpt2s")
    parser.add_argument("--calls", type=int, default=30, help="calls timed for the monitoring work alone")
    args = parser.parse_args()
    logging.getLogger("gradwatch").setLevel(logging.ERROR)  # the events of a synthetic run are not the point
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, threads {torch.get_num_threads()}, quick={args.quick}, torch {torch.__version__}")
    for name in args.workloads.split(","):
        medians = run(name, device, args.quick, args.rounds, args.steps)
        plain, check = medians["plain"], medians["check"]
        print(f"\n{name}: median step, ratio to plain, added time as a ratio to the check's added time")
        for variant, t in medians.items():
            added = (t - plain) / (check - plain) if check > plain else float("nan")
            print(f"  {variant:<24} {t * 1e3:9.2f} ms  x{t / plain:6.3f}  {added:7.2f}")
        print(
            f"  forward_check vs detect_anomaly, added time: "
            f"{(medians['forward_check'] - plain) / (medians['detect_anomaly'] - plain):.3f}"
        )
        check_ms, ratio_ms = work_alone(name, device, args.quick, args.calls)
        print(
            f"  work alone: check {check_ms:.3f} ms, update-ratio measurement {ratio_ms:.3f} ms "
            f"(x{ratio_ms / check_ms:.2f} of a check; every N steps: x{ratio_ms / check_ms:.2f}/N)"
        )


if __name__ == "__main__":
    main()
