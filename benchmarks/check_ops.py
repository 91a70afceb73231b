"""What one check costs, the fused op (``grad_check``) against the Python pipeline (issue 14).

Per workload (ResNet-50's, GPT-2 small's and 4,098 tiny tensors' shapes, seeded gradient-like
values, fused AdamW) and per policy (``warn``, ``skip``, ``clip``), a ``GradWatch`` with
``attach=False`` runs :meth:`GradWatch.check` on fixed gradients (rescaled by a seeded factor near 1
before every call, outside the timing, so the detector never sees one value over and over). Both
pipelines run in the same process, interleaved call by call:

* **top-level ops**: operators dispatched by the check that are not nested in another operator
  (``torch.profiler``, the issue's count; on a GPU each is about one launch plus host dispatch);
* **Python calls**: Python-level function calls during the check (``sys.setprofile``), the host
  work between the optimizer hook and the op;
* **time**: wall time of one check, median of the interleaved repeats, and the ratio of the two
  pipelines (ratios from one run only: the machine is shared);
* **launches** (``--device cuda``): CUDA kernels one check runs (``torch.profiler``; copies and
  memsets not counted), the issue's bound being 3.

``python -m benchmarks.check_ops [--device cpu|cuda] [--repeats N] [--quick] [--out DIR]`` writes
``check_ops_<device>.json`` and ``.md`` there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gradwatch
from gradwatch._policy import DecisionContext
from gradwatch._records import encode_record

from .op_bench import gpt2_small_shapes, make_grads, resnet50_shapes, tiny_shapes

__all__ = ["top_level_ops", "python_calls", "make_watch", "run", "markdown"]

WORKLOADS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": resnet50_shapes,
    "gpt2s": gpt2_small_shapes,
    "tiny4098": lambda: tiny_shapes(4098),
}
POLICIES = ("warn", "skip", "clip")


def _is_op(name: str) -> bool:
    return "::" in name and not name.startswith(("cudaLaunch", "cuda"))


def top_level_ops(fn: Callable[[], Any]) -> list[str]:
    """The operators ``fn`` dispatches that are not nested in another operator (``torch.profiler``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = []
    for event in prof.events():
        if not _is_op(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and not _is_op(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            names.append(event.name)
    return names


def cuda_launches(fn: Callable[[], Any]) -> list[str]:
    """The CUDA kernels ``fn`` runs (``torch.profiler``; memory copies and memsets left out)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return [
        e.name
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]


def python_calls(fn: Callable[[], Any]) -> tuple[int, int]:
    """Calls ``fn`` makes from Python: (Python functions, builtins such as torch functions); ``fn`` excluded.

    Counted with ``sys.setprofile`` ("call" and "c_call" events).
    """
    calls = {"call": 0, "c_call": 0}

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event in calls:
            calls[event] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls["call"] - 1, calls["c_call"] - 1  # fn itself; sys.setprofile(None)


class _Setup:
    """A monitor over parameters of the given shapes, with gradients that can be put back before each check."""

    def __init__(self, shapes: list[tuple[int, ...]], policy: str, fused: bool, seed: int = 0, device: str = "cpu"):
        self.params = nn.ParameterList([nn.Parameter(torch.zeros(s, device=device)) for s in shapes])
        self.saved = make_grads(shapes, torch.device(device))
        for p, g in zip(self.params, self.saved, strict=True):
            p.grad = g.clone()
        optimizer = torch.optim.AdamW(self.params, lr=1e-3, fused=True)
        self.watch = make_watch(self.params, optimizer, policy, fused)
        self.generator = torch.Generator().manual_seed(seed)

    def restore(self) -> None:
        factor = float(torch.randn((), generator=self.generator).mul(0.1).exp())
        with torch.no_grad():
            for p, g in zip(self.params, self.saved, strict=True):
                torch.mul(g, factor, out=p.grad)

    def check(self) -> None:
        self.watch.check()
        self.watch.step_control.restore()  # what the optimizer's post-hook does after the step
        if self.params[0].is_cuda:
            torch.cuda.synchronize()  # a check's time includes its kernels

    def decide(self, packed: torch.Tensor, flag: torch.Tensor) -> None:
        """Detection, decision and the record's encoding alone, on given statistics (the part the op replaces)."""
        stages = self.watch._stages
        if stages.fused is not None:
            stages.fused(packed, None, flag)
            return
        detection, loss_flags = stages.detect(packed, stages.all_index, flag, None, True)
        ctx = DecisionContext(self.watch.step, packed, detection, stages.param_names, flag, loss_flags)
        decision = stages.decide(ctx, len(stages.param_names), True)
        encode_record(packed, detection, decision.clip_factor, decision.skip, decision.raise_now, flag, decision.extras)


def make_watch(model: nn.Module, optimizer: torch.optim.Optimizer, policy: str, fused: bool) -> gradwatch.GradWatch:
    """A ``GradWatch(attach=False)``; ``fused=False`` forces the Python pipeline (the oracle)."""
    watch = gradwatch.GradWatch(model, optimizer, policy=policy, attach=False)
    if not fused:
        watch._stages.fused = None
    return watch


def run(repeats: int, quick: bool, device: str = "cpu") -> dict[str, Any]:
    """Counts and times one check per (workload, policy, pipeline)."""
    results: dict[str, Any] = {"repeats": repeats, "threads": torch.get_num_threads(), "device": device, "rows": []}
    workloads = {"tiny4098": lambda: tiny_shapes(200)} if quick else WORKLOADS
    for name, shapes_fn in workloads.items():
        shapes = shapes_fn()
        for policy in POLICIES:
            setups = {fused: _Setup(shapes, policy, fused, device=device) for fused in (False, True)}
            row: dict[str, Any] = {"workload": name, "tensors": len(shapes), "policy": policy}
            for fused, s in setups.items():
                for _ in range(3):  # warm-up: plans, caches, the op's state bound
                    s.restore()
                    s.check()
                s.restore()
                key = "fused" if fused else "python"
                row[f"{key}_ops"] = len(top_level_ops(s.check))
                s.restore()
                row[f"{key}_calls"], row[f"{key}_c_calls"] = python_calls(s.check)
                if device == "cuda":
                    s.restore()
                    row[f"{key}_kernels"] = cuda_launches(s.check)
            samples: dict[bool, list[float]] = {False: [], True: []}
            alone: dict[bool, list[float]] = {False: [], True: []}
            packed = gradwatch.grad_stats_packed([p.grad for p in setups[True].params])
            flag = torch.zeros((), dtype=torch.bool, device=device)
            for _ in range(repeats):
                for fused, s in setups.items():
                    s.restore()
                    start = time.perf_counter()
                    s.check()
                    samples[fused].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    s.decide(packed, flag)
                    alone[fused].append(time.perf_counter() - start)
            # the fused check's two forms on the same gradients: grad_stats then grad_check, and grad_stats_check
            fused, grads = setups[True].watch._stages.fused, [p.grad for p in setups[True].params]
            forms: dict[str, list[float]] = {"two_ops": [], "one_op": []}
            for _ in range(repeats):
                for form in forms:
                    start = time.perf_counter()
                    if form == "two_ops":
                        fused(torch.ops.gradwatch.grad_stats(grads))
                    else:
                        fused.with_stats(grads)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    forms[form].append(time.perf_counter() - start)
            row["two_ops_us"] = 1e6 * statistics.median(forms["two_ops"])
            row["one_op_us"] = 1e6 * statistics.median(forms["one_op"])
            row["python_ms"] = 1e3 * statistics.median(samples[False])
            row["fused_ms"] = 1e3 * statistics.median(samples[True])
            row["python_decide_us"] = 1e6 * statistics.median(alone[False])
            row["fused_decide_us"] = 1e6 * statistics.median(alone[True])
            results["rows"].append(row)
    return results


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table."""
    device = results.get("device", "cpu")
    lines = [
        f"One check on {device} ({results['threads']} CPU threads; median of {results['repeats']} interleaved "
        "checks; ops: top-level dispatcher ops, torch.profiler; calls: Python function calls, sys.setprofile):",
        "",
        "| gradients | policy | ops | Python calls (py / builtin) | check ms | ratio | detect+decide µs | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['workload']} ({r['tensors']} tensors) | {r['policy']} | {r['python_ops']} → {r['fused_ops']} | "
            f"{r['python_calls']} / {r['python_c_calls']} → {r['fused_calls']} / {r['fused_c_calls']} | "
            f"{r['python_ms']:.2f} → {r['fused_ms']:.2f} | {r['python_ms'] / r['fused_ms']:.2f}x | "
            f"{r['python_decide_us']:.0f} → {r['fused_decide_us']:.0f} | "
            f"{r['python_decide_us'] / r['fused_decide_us']:.1f}x |"
        )
    lines += ["", "Statistics + check alone, grad_stats then grad_check → grad_stats_check (µs, median):", ""]
    for r in results["rows"]:
        lines.append(
            f"- {r['workload']} {r['policy']}: {r['two_ops_us']:.0f} → {r['one_op_us']:.0f} "
            f"({r['two_ops_us'] / r['one_op_us']:.2f}x)"
        )
    if device == "cuda":
        lines += ["", "CUDA kernels per check (Python pipeline → fused op):", ""]
        for r in results["rows"]:
            lines.append(
                f"- {r['workload']} {r['policy']}: {len(r['python_kernels'])} → {len(r['fused_kernels'])} "
                f"({', '.join(k.split('(')[0][-40:] for k in r['fused_kernels'])})"
            )
    lines += [
        "",
        "Columns: Python pipeline → fused op. *check*: one whole GradWatch.check (statistics pass included, "
        "the record of the previous check drained); *detect+decide*: what the op replaces alone "
        "(Detector.detect + PolicySet.decide + encode_record against one grad_check call), on the same statistics.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="one small workload, few repeats (smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    results = run(3 if args.quick else args.repeats, args.quick, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"check_ops_{args.device}.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (args.out / f"check_ops_{args.device}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
