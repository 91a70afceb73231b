"""``python -m benchmarks.origin_cost [--quick] [--reps N]``: what issue 16's origin and ratio features cost.

Whole training steps, each variant once per round, in a fixed order; per variant the median over
the rounds of its step time minus the plain step's of the same round (paired differences: a
shared machine's drift cancels). Variants:

* ``check (today's)``: the monitor's check, as its optimizer pre-hook runs it.
* ``forward_check``: the forward hooks of :class:`~gradwatch.forward_check.ForwardCheck`, collected
  and read once per step.
* ``detect_anomaly``: the step under ``torch.autograd.detect_anomaly()``.
* ``backward order learning``: a backward pass with the origin's learning hooks on (the monitor
  does this on the first backward, on graph changes and once every 500 checks).
* ``update ratio (every step)``: the parameter snapshot before ``optimizer.step()`` and the fused
  norms after it (``update_ratio_every=1``; ``=N`` pays it every N-th step).

Then the monitoring work alone, timed directly: one check against one update-ratio measurement.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch

import gradwatch
from benchmarks.workloads import Workload, build_workload
from gradwatch.forward_check import ForwardCheck
from gradwatch.origin import BackwardOrder
from gradwatch.update_ratio import UpdateRatios


def _step(w: Workload, i: int) -> None:
    batch = w.batches[i % len(w.batches)]
    loss = w.loss_fn(w.model, batch)
    loss.backward()
    w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=True)


def _sync(w: Workload) -> None:
    if w.device.type == "cuda":
        torch.cuda.synchronize(w.device)


def _workload(name: str, device: torch.device, quick: bool) -> Workload:
    """``resnet18``: torchvision ResNet-18, batch 8 of 3x32x32, SGD with momentum (sized for a shared
    2-core CPU); otherwise a workload of :mod:`benchmarks.workloads`."""
    if name != "resnet18":
        return build_workload(name, device, quick=quick)
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (8,), generator=g).to(device))
        for _ in range(4)
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    return Workload("resnet18", "ResNet-18, batch 8 x 3x32x32, SGD momentum", model, opt, batches, loss)


def run(name: str, device: torch.device, quick: bool, reps: int) -> dict[str, float]:
    """Per variant, the median over ``reps`` of its step time minus the plain step's of the same round."""
    w = _workload(name, device, quick)
    watch = gradwatch.GradWatch(w.model, w.optimizer, policy="warn", attach=False)
    forward = ForwardCheck(w.model)
    order = BackwardOrder(watch._params)
    ratios = UpdateRatios(watch._params)
    present = list(range(len(watch.param_names)))

    def checked(i: int) -> None:  # what the optimizer pre-hook runs: the check, then the step
        w.loss_fn(w.model, w.batches[i % len(w.batches)]).backward()
        watch.check()
        w.optimizer.step()
        watch.step_control.restore()
        w.optimizer.zero_grad(set_to_none=True)

    def forward_checked(i: int) -> None:
        handles = forward.register()
        _step(w, i)
        forward.collect(i)
        forward.take(i)
        for h in handles:
            h.remove()

    def anomaly(i: int) -> None:
        with torch.autograd.detect_anomaly():
            _step(w, i)

    def learning(i: int) -> None:  # a backward pass with the backward-order hooks on (1 in 500 by default)
        order.arm()
        _step(w, i)
        order.update(present)

    def ratio(i: int) -> None:  # update_ratio_every=1: snapshot before the step, fused norms after
        w.loss_fn(w.model, w.batches[i % len(w.batches)]).backward()
        ratios.snapshot()
        w.optimizer.step()
        ratios.put(i, ratios.measure(), None)
        ratios.take(i)
        w.optimizer.zero_grad(set_to_none=True)

    variants: dict[str, Callable[[int], None]] = {
        "plain": lambda i: _step(w, i),
        "check (today's)": checked,
        "forward_check": forward_checked,
        "detect_anomaly": anomaly,
        "backward order learning": learning,
        "update ratio (every step)": ratio,
    }
    added: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(-2, reps):  # two rounds of warm-up
        times = {}
        for v, fn in variants.items():
            _sync(w)
            t = time.perf_counter()
            fn(i)
            _sync(w)
            times[v] = time.perf_counter() - t
        if i >= 0:
            for v in variants:
                added[v].append(times[v] - times["plain"] if v != "plain" else times[v])
    watch.remove()
    return {v: statistics.median(x) for v, x in added.items()}


def work_alone(name: str, device: torch.device, quick: bool, calls: int) -> tuple[float, float]:
    """Median ms of one full check and of one update-ratio measurement (snapshot + fused norms), interleaved."""
    w = _workload(name, device, quick)
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
    parser.add_argument("--quick", action="store_true", help="the CI smoke sizes of benchmarks.workloads")
    parser.add_argument("--reps", type=int, default=15, help="rounds of all variants")
    parser.add_argument("--workloads", default="resnet18,gpt2s", help="resnet18 or names of benchmarks.workloads")
    parser.add_argument("--calls", type=int, default=30, help="calls timed for the monitoring work alone")
    args = parser.parse_args()
    logging.getLogger("gradwatch").setLevel(logging.ERROR)  # the events of a synthetic run are not the point
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}, threads {torch.get_num_threads()}, quick={args.quick}, torch {torch.__version__}")
    for name in args.workloads.split(","):
        medians = run(name, device, args.quick, args.reps)
        plain, check = medians["plain"], medians["check (today's)"]
        print(f"\n{name}: plain step {plain * 1e3:.1f} ms; added per step (median of paired differences)")
        for variant, t in medians.items():
            if variant != "plain":
                print(
                    f"  {variant:<28} {t * 1e3:+9.2f} ms  {t / plain:+7.1%} of the step  x{t / check:6.2f} of the check"
                )
        print(
            f"  forward_check / detect_anomaly (added time): {medians['forward_check'] / medians['detect_anomaly']:.3f}"
        )
        check_ms, ratio_ms = work_alone(name, device, args.quick, args.calls)
        print(
            f"  work alone: check {check_ms:.3f} ms, update-ratio measurement {ratio_ms:.3f} ms "
            f"(x{ratio_ms / check_ms:.2f} of a check; every N steps: x{ratio_ms / check_ms:.2f}/N)"
        )


if __name__ == "__main__":
    main()
