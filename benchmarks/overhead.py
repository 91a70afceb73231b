"""Overhead suite (issue 6): what each way of watching gradients costs, measured side by side.

Two measurements per workload and method, both on the same model and the same seeded batches:

* **whole steps** (forward + backward + monitoring + optimizer step), interleaved round-robin over
  methods so that drift of a shared or thermally throttled machine hits all methods alike; the
  median over rounds is compared with the unmonitored step;
* **monitoring work alone**: only the method's per-step work, on fixed gradients restored before
  every call, many repeats, median. A 1% overhead is invisible in whole-step medians on a noisy
  CPU; this number is not.

Plus counts of what the monitoring work does: host reads of tensor values (``.item()`` and
friends, counted at the dispatcher), aten ops dispatched, and on CUDA the synchronizing calls
(``torch.cuda.set_sync_debug_mode``) and kernel launches (``torch.profiler``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .methods import METHODS, Method, make_methods
from .workloads import WORKLOADS, Workload, build_workload

__all__ = ["SuiteConfig", "evaluate_targets", "run_suite", "render_markdown", "write_outputs", "update_results_md"]

RESULTS_SECTION = "## Monitoring overhead (issue 6)"


@dataclass
class SuiteConfig:
    """What to run and how often.

    Attributes:
        device: where the workloads run.
        quick: CI smoke size: tiny models, few repeats; numbers are meaningless, the code paths are not.
        workloads: workload names, a subset of :data:`benchmarks.workloads.WORKLOADS`.
        methods: method names (None: all available); the baseline always runs.
        rounds: round-robin rounds of whole-step timing.
        steps_per_block: timed steps per method per round.
        warmup_steps: untimed steps after attaching a method, per round.
        alone_rounds: round-robin rounds of monitoring-alone timing.
        alone_calls: timed calls per method per alone round.
        max_warm_calls: caps a method's untimed warm-up calls (ZClip wants 26); None: no cap.
        progress: show a tqdm progress bar.
    """

    device: torch.device
    quick: bool = False
    workloads: Sequence[str] = WORKLOADS
    methods: Sequence[str] | None = None
    rounds: int = 7
    steps_per_block: int = 2
    warmup_steps: int = 1
    alone_rounds: int = 10
    alone_calls: int = 5
    max_warm_calls: int | None = None
    progress: bool = True

    @classmethod
    def for_mode(cls, device: torch.device, quick: bool, **overrides: Any) -> SuiteConfig:
        """Defaults for the benchmark (``quick=False``) or the CI smoke run (``quick=True``)."""
        if quick:
            base = dict(rounds=2, steps_per_block=1, warmup_steps=1, alone_rounds=1, alone_calls=2, max_warm_calls=1)
        elif device.type == "cuda":
            base = dict(rounds=8, steps_per_block=3, warmup_steps=2, alone_rounds=10, alone_calls=10)
        else:
            base = dict(rounds=5, steps_per_block=2, warmup_steps=1, alone_rounds=10, alone_calls=4)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(device=device, quick=quick, **base)


# ---------------------------------------------------------------------------------------------
# Timing and counting primitives


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(workload: Workload) -> contextlib.AbstractContextManager[Any]:
    if workload.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(workload.device.type, dtype=workload.autocast_dtype)


def train_step(workload: Workload, method: Method, batch_index: int) -> None:
    """One full training step with ``method`` watching it."""
    batch = workload.batches[batch_index % len(workload.batches)]
    workload.optimizer.zero_grad(set_to_none=True)
    with method.step_context():  # detect_anomaly must cover forward and backward
        with _autocast(workload):
            loss = workload.loss_fn(workload.model, batch)
        loss.backward()
    method.after_backward(workload)
    workload.optimizer.step()


class _DispatchCounter(TorchDispatchMode):
    """Counts aten ops reaching the dispatcher and, among them, reads of a value to the host."""

    _HOST_READS = {torch.ops.aten._local_scalar_dense.default}  # .item(), bool(t), float(t), int(t)

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops += 1
        if func in self._HOST_READS:
            self.host_reads += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Counts:
    """What the monitoring work does per training step (averaged over ``period`` steps for ``every=N``)."""

    aten_ops: float
    host_reads: float
    cuda_syncs: float | None = None
    cuda_launches: float | None = None

    def minus(self, other: Counts) -> Counts:
        def sub(a: float | None, b: float | None) -> float | None:
            return None if a is None else a - (b or 0)

        return Counts(
            self.aten_ops - other.aten_ops,
            self.host_reads - other.host_reads,
            sub(self.cuda_syncs, other.cuda_syncs),
            sub(self.cuda_launches, other.cuda_launches),
        )


def count_work(fn: Callable[[], Any], device: torch.device, per: int = 1) -> Counts:
    """Runs ``fn`` (three times on CUDA) and counts what it dispatches, reads and launches, divided by ``per``."""
    with _DispatchCounter() as counter:
        fn()
    counts = Counts(counter.ops / per, counter.host_reads / per)
    if device.type != "cuda":
        return counts
    _sync(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    counts.cuda_syncs = sum("synchroniz" in str(w.message) for w in caught) / per
    _sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        _sync(device)
    counts.cuda_launches = sum(e.count for e in prof.key_averages() if "LaunchKernel" in e.key) / per
    return counts


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class _TrainingState:
    """A snapshot of weights and optimizer state, restored before each block of steps.

    Every method then trains from the same weights on the same batches, and no run can drift into
    divergence (NaN gradients would change what every method costs, and stop detect_anomaly).
    """

    def __init__(self, workload: Workload):
        opt = workload.optimizer
        tensors = [p for p in workload.model.parameters()]
        tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        self.pairs = [(t, t.detach().clone()) for t in tensors]

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self.pairs:
                t.copy_(saved)


class _Grads:
    """A snapshot of the gradients, written back before each monitoring-alone call as backward would.

    Gradients are written in backward order (last parameter first) and each parameter's backward
    hooks run right after its gradient is written, as in a real backward pass. Per-layer hooks thus
    read each gradient while it is still in cache, as they do in training, and so does gradwatch's
    in-backward measurement; a check after backward finds the latest-written gradients in cache
    first. Only the hooks' time is counted, not the writes.

    Each restore scales the snapshot by a seeded factor near 1 (log-normal, sigma 0.1): the same
    gradients over and over would drive adaptive detectors' variances to zero (and, in float32, into
    slow denormals), a state no real run reaches.
    """

    def __init__(self, model: torch.nn.Module, seed: int = 0):
        self.pairs = [(p, p.grad.detach().clone()) for p in model.parameters() if p.grad is not None]
        self.generator = torch.Generator().manual_seed(seed)

    def restore(self, device: torch.device, run_hooks: bool = True) -> float:
        """Writes every gradient back, running backward hooks; returns the seconds spent in hooks."""
        factor = float(torch.randn((), generator=self.generator).mul(0.1).exp())
        spent = 0.0
        with torch.no_grad():
            for p, g in reversed(self.pairs):
                if p.grad is None:
                    p.grad = g.clone()
                torch.mul(g, factor, out=p.grad)
                if run_hooks and (p._backward_hooks or p._post_accumulate_grad_hooks):
                    spent += _timed(lambda p=p: _run_backward_hooks(p), device)
        return spent


def _run_backward_hooks(p: torch.Tensor) -> None:
    """What autograd runs for a leaf once its gradient is ready: tensor hooks, then post-accumulate hooks."""
    for hook in (p._backward_hooks or {}).values():
        hook(p.grad)
    for hook in (p._post_accumulate_grad_hooks or {}).values():
        hook(p)


def _monitoring_alone(grads: _Grads, method: Method, workload: Workload) -> float:
    """Seconds of one step's monitoring work, amortized over ``method.period`` steps."""
    device = workload.device
    spent = 0.0
    for _ in range(method.period):
        spent += grads.restore(device)
        spent += _timed(lambda: method.monitor_once(workload), device)
    return spent / method.period


def _count_monitoring(grads: _Grads, method: Method, workload: Workload) -> Counts:
    """Counts of one step's monitoring work (hooks included), less those of the restores themselves."""

    def steps(monitor: bool) -> None:
        for _ in range(method.period):
            grads.restore(workload.device, run_hooks=monitor)
            if monitor:
                method.monitor_once(workload)

    device = workload.device
    return count_work(lambda: steps(True), device, method.period).minus(
        count_work(lambda: steps(False), device, method.period)
    )


# ---------------------------------------------------------------------------------------------
# The suite


class _Progress:
    """A tqdm bar when wanted and available, else nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int = 1, **postfix: str) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _rotated(items: list[Method], shift: int) -> Iterator[Method]:
    # Rotating the order each round keeps any method from always running right after another.
    shift %= len(items)
    return iter(items[shift:] + items[:shift])


def _work_units(config: SuiteConfig, num_methods: int) -> int:
    per_method = config.rounds * (config.warmup_steps + config.steps_per_block) + config.alone_rounds * (
        1 + config.alone_calls
    )
    return num_methods * per_method


def _median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples) if samples else math.nan


def _iqr_ms(samples: list[float]) -> float:
    if len(samples) < 2:
        return 0.0
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return 1e3 * (q[2] - q[0])


def run_workload(name: str, config: SuiteConfig, progress: _Progress) -> dict[str, Any]:
    """Measures every method on workload ``name``; returns its JSON-ready results."""
    workload = build_workload(name, config.device, quick=config.quick)
    methods = list(make_methods(None if config.methods is None else list(config.methods)))
    baseline = methods[0]
    device = config.device

    for i in range(max(2, config.warmup_steps)):  # optimizer state, allocator, one-time kernels
        train_step(workload, baseline, i)

    # 1. Monitoring work alone, on the gradients of one fixed step.
    train_step(workload, baseline, 0)
    workload.optimizer.zero_grad(set_to_none=False)
    with _autocast(workload):
        loss = workload.loss_fn(workload.model, workload.batches[0])
    loss.backward()
    grads = _Grads(workload.model)
    alone: dict[str, list[float]] = {m.name: [] for m in methods}
    separable: dict[str, bool] = {}
    counts: dict[str, Counts] = {}
    for r in range(config.alone_rounds):
        for method in _rotated(methods, r):
            progress.update(0, workload=name, phase="alone", method=method.name)
            method.attach(workload)
            try:
                warm_calls = method.warm_calls if r == 0 else 1
                for _ in range(min(warm_calls, config.max_warm_calls or warm_calls)):  # untimed
                    grads.restore(device)
                    separable[method.name] = method.monitor_once(workload)
                progress.update(1)
                for _ in range(config.alone_calls):
                    alone[method.name].append(_monitoring_alone(grads, method, workload))
                    progress.update(1)
                if r == 0 and separable[method.name]:
                    counts[method.name] = _count_monitoring(grads, method, workload)
            finally:
                method.detach()

    # 2. Whole training steps, round-robin; every block starts from the same weights, and batch k
    # of a block is the same batch for every method.
    state = _TrainingState(workload)
    steps: dict[str, list[float]] = {m.name: [] for m in methods}
    for r in range(config.rounds):
        for method in _rotated(methods, r):
            progress.update(0, workload=name, phase="steps", method=method.name)
            state.restore()
            method.attach(workload)
            try:
                for k in range(config.warmup_steps):
                    train_step(workload, method, k)
                    progress.update(1)
                for k in range(config.steps_per_block):
                    steps[method.name].append(_timed(lambda m=method, k=k: train_step(workload, m, k), device))
                    progress.update(1)
            finally:
                method.detach()

    # Work that cannot be separated from the step (detect_anomaly) is counted as a step difference.
    def step_counts(method: Method) -> Counts:
        state.restore()
        method.attach(workload)
        try:
            return count_work(lambda: train_step(workload, method, 0), device)
        finally:
            method.detach()

    base_counts = step_counts(baseline)
    for method in methods:
        if not separable[method.name]:
            counts[method.name] = step_counts(method).minus(base_counts)

    base_step = statistics.median(steps[baseline.name])
    results: dict[str, Any] = {}
    for method in methods:
        step_med = statistics.median(steps[method.name])
        if separable[method.name]:
            alone_ms, alone_kind = _median_ms(alone[method.name]), "measured"
        else:
            alone_ms, alone_kind = 1e3 * (step_med - base_step), "step difference"
        c = counts[method.name]
        results[method.name] = {
            "label": method.label,
            "computes": method.computes,
            "implementation": method.implementation,
            "period": method.period,
            "step_ms": 1e3 * step_med,
            "step_ms_iqr": _iqr_ms(steps[method.name]),
            "step_samples": len(steps[method.name]),
            "overhead_pct": 100.0 * (step_med - base_step) / base_step,
            "monitor_ms": alone_ms,
            "monitor_ms_iqr": _iqr_ms(alone[method.name]) if separable[method.name] else None,
            "monitor_kind": alone_kind,
            "monitor_pct_of_step": 100.0 * alone_ms / (1e3 * base_step),
            "host_reads_per_step": c.host_reads,
            "aten_ops_per_step": c.aten_ops,
            "cuda_syncs_per_step": c.cuda_syncs,
            "cuda_launches_per_step": c.cuda_launches,
        }
    return {
        "description": workload.description,
        "num_tensors": workload.num_tensors,
        "num_params": workload.num_params,
        "baseline_step_ms": 1e3 * base_step,
        "methods": results,
    }


def _environment(config: SuiteConfig) -> dict[str, Any]:
    import gradwatch

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": config.device.type,
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gradwatch": gradwatch.__version__,
        "gradwatch_cpu_kernel": gradwatch.cpu_kernel_capability(),
        "quick": config.quick,
        "rounds": config.rounds,
        "steps_per_block": config.steps_per_block,
        "alone_samples": config.alone_rounds * config.alone_calls,
    }
    if config.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(config.device)
    return env


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_suite(config: SuiteConfig) -> dict[str, Any]:
    """Runs every workload; returns ``{"environment": ..., "workloads": {name: ...}}``."""
    unknown = set(config.workloads) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"unknown workloads {sorted(unknown)}; expected some of {', '.join(WORKLOADS)}")
    num_methods = len(list(make_methods(None if config.methods is None else list(config.methods))))
    progress = _Progress(len(config.workloads) * _work_units(config, num_methods), config.progress)
    # gradwatch's "warn" policy logs each anomaly; the random-data workloads trip the fixed
    # clip limit every step, and log lines would only break the progress bar.
    gradwatch_logger = logging.getLogger("gradwatch")
    level = gradwatch_logger.level
    gradwatch_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
            workloads = {name: run_workload(name, config, progress) for name in config.workloads}
    finally:
        gradwatch_logger.setLevel(level)
        progress.close()
    skipped = {name: "not installed (pip install zclip)" for name, spec in METHODS.items() if not spec.available()}
    return {"environment": _environment(config), "workloads": workloads, "skipped_methods": skipped}


# ---------------------------------------------------------------------------------------------
# Reporting


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    if float(x).is_integer() and digits == 0:
        return str(int(x))
    if math.isnan(x):
        return "n/a"
    return f"{x:.{digits}f}"


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks the issue's targets against measured results; each entry says what, the value, and whether met.

    Targets whose methods or workloads were not run are left out.
    """
    cuda = results["environment"]["device"] == "cuda"
    out: list[dict[str, Any]] = []

    def add(target: str, value: float, met: bool, unit: str = "") -> None:
        out.append({"target": target, "value": value, "unit": unit, "met": bool(met)})

    def method(workload: str, name: str) -> dict[str, Any] | None:
        return results["workloads"].get(workload, {}).get("methods", {}).get(name)

    watched = "gradwatch_detect"
    if not cuda:
        m = method("resnet50", watched)
        if m is not None:
            add(
                "ResNet-50: statistics + adaptive detection < 2% of the step (monitoring alone)",
                m["monitor_pct_of_step"],
                m["monitor_pct_of_step"] < 2.0,
                "%",
            )
        for w in results["workloads"]:
            ours = method(w, "gradwatch_stats")
            composites = [c for c in (method(w, "torch_loop"), method(w, "torch_foreach")) if c is not None]
            if ours is not None and composites:
                ratio = min(c["monitor_ms"] for c in composites) / ours["monitor_ms"]
                add(
                    f"{w}: >= 5x less monitoring time than the best torch composite (same statistics)",
                    ratio,
                    ratio >= 5.0,
                    "x",
                )
            hooks = method(w, "hooks")
            for name, how in ((watched, "defaults"), ("gradwatch_in_backward", "measure_in_backward=True")):
                ours = method(w, name)
                if ours is not None and hooks is not None:
                    ratio = hooks["monitor_ms"] / ours["monitor_ms"]
                    add(
                        f"{w}: no more monitoring time than the per-layer hooks (hooks / gradwatch, {how})",
                        ratio,
                        ratio >= 1.0,
                        "x",
                    )
            ours, zclip = method(w, "gradwatch_adaptive_clip"), method(w, "zclip")
            if ours is not None and zclip is not None:
                ratio = zclip["monitor_ms"] / ours["monitor_ms"]
                add(
                    f"{w}: cheaper than ZClip (ZClip / gradwatch adaptive clip, monitoring alone)",
                    ratio,
                    ratio > 1.0,
                    "x",
                )
        return out
    m = method("resnet50", watched)
    if m is not None:
        add(
            "ResNet-50: monitored step within 1% of the unmonitored step (step overhead)",
            m["overhead_pct"],
            m["overhead_pct"] <= 1.0,
            "%",
        )
        add(
            "ResNet-50: monitoring alone within 1% of the step",
            m["monitor_pct_of_step"],
            m["monitor_pct_of_step"] <= 1.0,
            "%",
        )
    for w in results["workloads"]:
        for name, m in results["workloads"][w]["methods"].items():
            if name.startswith("gradwatch") and m["cuda_syncs_per_step"] is not None:
                add(f"{w}: {name} makes zero host syncs", m["cuda_syncs_per_step"], m["cuda_syncs_per_step"] == 0)
    launches = {
        w: (m["cuda_launches_per_step"], results["workloads"][w]["num_tensors"])
        for w in results["workloads"]
        if (m := method(w, watched)) is not None and m["cuda_launches_per_step"] is not None
    }
    if len(launches) > 1:
        values = sorted({v for v, _ in launches.values()})
        detail = ", ".join(f"{w}: {v:g} for {n} tensors" for w, (v, n) in launches.items())
        add(
            f"launches independent of the parameter count ({detail})",
            values[-1] - values[0],
            len(values) == 1,
            " launches spread",
        )
    ours, hooks = method("resnet50", watched), method("resnet50", "hooks")
    if ours is not None and hooks is not None:
        ratio = hooks["monitor_ms"] / ours["monitor_ms"]
        add("ResNet-50: per-layer hooks >= 20x the monitoring time of gradwatch", ratio, ratio >= 20.0, "x")
    return out


def render_markdown(results: dict[str, Any]) -> str:
    """The results as markdown: one table per workload and the notes needed to read them."""
    env = results["environment"]
    cuda = env["device"] == "cuda"
    where = env.get("gpu") if cuda else f"{env['cpu']}, {env['threads']} threads"
    lines = [
        f"Measured {env['date']} on {where}; torch {env['torch']}, gradwatch {env['gradwatch']} "
        f"(CPU kernel {env['gradwatch_cpu_kernel']}). Whole steps: median of {env['rounds'] * env['steps_per_block']} "
        f"steps per method, round-robin; monitoring alone: median of {env['alone_samples']} calls on fixed gradients."
    ]
    if env["quick"]:
        lines.append("\n**Quick (smoke-test) size: the numbers below say nothing about performance.**")
    if results.get("skipped_methods"):
        lines.append("\nSkipped: " + ", ".join(f"{k} ({v})" for k, v in results["skipped_methods"].items()))
    count_cols = "host syncs / step | kernel launches / step" if cuda else "host reads / step | aten ops / step"
    for name, w in results["workloads"].items():
        lines += [
            "",
            f"**{name}**: {w['description']}; unmonitored step {w['baseline_step_ms']:.1f} ms.",
            "",
            "| method | computes | step ms (IQR) | step overhead % | monitoring alone ms | alone % of step | "
            f"{count_cols} |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m in w["methods"].values():
            alone = _fmt(m["monitor_ms"], 3) + (" (step diff.)" if m["monitor_kind"] != "measured" else "")
            if cuda:
                c1, c2 = m["cuda_syncs_per_step"], m["cuda_launches_per_step"]
            else:
                c1, c2 = m["host_reads_per_step"], m["aten_ops_per_step"]
            c1, c2 = (_fmt(c, 0 if c is None or float(c).is_integer() else 1) for c in (c1, c2))
            label = m["label"] + (f" [{m['implementation']}]" if m["implementation"] else "")
            lines.append(
                f"| {label} | {m['computes']} | {_fmt(m['step_ms'], 1)} ({_fmt(m['step_ms_iqr'], 1)}) | "
                f"{_fmt(m['overhead_pct'], 1)} | {alone} | {_fmt(m['monitor_pct_of_step'], 2)} | {c1} | {c2} |"
            )
    targets = evaluate_targets(results)
    if targets:
        lines += ["", "Targets (from issue 6; benchmarks, not tests):", ""]
        for t in targets:
            lines.append(f"- {'met' if t['met'] else '**not met**'}: {t['target']}: {t['value']:.3g}{t['unit']}")
    lines += ["", *(_NOTES_CUDA if cuda else _NOTES_CPU)]
    return "\n".join(lines) + "\n"


_NOTES_COMMON = [
    "- *step overhead %*: median monitored step vs median unmonitored step. Differences under a few percent "
    "are within run-to-run noise; read *monitoring alone* for small overheads.",
    "- *monitoring alone*: only the monitoring work of one step, on fixed gradients written back before each "
    "call the way backward writes them (last parameter first), with each parameter's backward hooks run and timed "
    "right after its gradient is written, as in training (per-layer hooks and gradwatch's in-backward buckets "
    "read gradients still in cache), plus the call after backward. "
    "For `every=N` it is the cost amortized over N steps (the step median then shows an unsampled step). "
    "`detect_anomaly` cannot be separated from the step, so its figure is the step-time difference.",
]
_NOTES_CPU = [
    *_NOTES_COMMON,
    "- *host reads*: `.item()`/`bool()`/`float()` reads of a tensor value, counted at the dispatcher "
    "(`aten::_local_scalar_dense`). On a CPU a host read costs no device sync, so the per-layer hooks pay only for "
    "their Python and one reduction per layer: both they and gradwatch sit near the memory-read floor here. "
    "On a GPU each of those reads is a full device sync.",
    "- *aten ops*: operators dispatched by the monitoring work (the CPU stand-in for kernel launches).",
]
_NOTES_CUDA = [
    *_NOTES_COMMON,
    "- *host syncs*: warnings from `torch.cuda.set_sync_debug_mode('warn')` during the monitoring call.",
    "- *kernel launches*: `cudaLaunchKernel`-family calls in `torch.profiler` during the monitoring call.",
]


def plot(results: dict[str, Any], path: Path) -> None:
    """A bar chart per workload: monitoring alone and whole-step overhead, % of the unmonitored step."""
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and remote machines
    import matplotlib.pyplot as plt

    workloads = results["workloads"]
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 6), squeeze=False)
    for ax, (name, w) in zip(axes[0], workloads.items(), strict=True):
        methods = [m for key, m in w["methods"].items() if key != "baseline"]
        labels = [m["label"] for m in methods]
        y = range(len(methods))
        alone = [m["monitor_pct_of_step"] for m in methods]
        step = [m["overhead_pct"] for m in methods]
        ax.barh([i - 0.2 for i in y], alone, height=0.4, label="monitoring alone")
        ax.barh([i + 0.2 for i in y], step, height=0.4, label="whole-step overhead", alpha=0.6)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("symlog", linthresh=1.0)  # spans 0.1% to 1000%, and noise may be negative
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_xlabel("% of the unmonitored step (symlog)")
        ax.set_title(f"{name} ({results['environment']['device']})")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Writes ``overhead_<device>.json``, ``.md`` and ``.png`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"overhead_{results['environment']['device']}" + ("_quick" if results["environment"]["quick"] else "")
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    results["targets"] = evaluate_targets(results)
    paths["json"].write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    paths["md"].write_text(render_markdown(results))
    plot(results, paths["png"])
    return paths


def update_results_md(results: dict[str, Any], path: Path) -> None:
    """Puts this run's tables under :data:`RESULTS_SECTION` in ``path``, one subsection per device.

    Only this device's subsection is replaced; other sections of the file (other benchmarks) and
    the other device's subsection are kept.
    """
    env = results["environment"]
    key = "### GPU" if env["device"] == "cuda" else "### CPU"
    where = env.get("gpu") if env["device"] == "cuda" else env["cpu"]
    body = f"{key}: {where}\n\n{render_markdown(results)}"
    if env["device"] != "cuda":
        body += (
            "- CPU whole-step medians carry several percent of run-to-run noise (see the IQR column), even on an "
            "idle machine; the monitoring-alone column is the reliable one.\n"
        )
    sections = _split_sections(path.read_text() if path.exists() else "# Benchmark results\n", "## ")
    subsections = _split_sections(sections.get(RESULTS_SECTION, RESULTS_SECTION + "\n\n" + _INTRO), "### ")
    subsections[key] = body
    head = subsections.pop("")  # the section heading and its intro
    ordered = [head] + [subsections[k] for k in sorted(subsections)]  # CPU before GPU
    sections[RESULTS_SECTION] = "\n".join(s.rstrip("\n") + "\n" for s in ordered)
    path.write_text("\n".join(s.rstrip("\n") + "\n" for s in sections.values()))


_INTRO = (
    "Produced by `python -m benchmarks` (`benchmarks/overhead.py`, issue 6); each run replaces the subsection "
    "for its device. JSON and charts: `benchmarks/results/overhead_<device>.*`.\n"
)


def _split_sections(text: str, level: str) -> dict[str, str]:
    """Splits markdown at headings starting with ``level``, in order; ``""`` keys the text before the first.

    Each value keeps its heading line. A heading's key is its text before any colon, so
    ``### CPU: <model>`` is found again when the CPU model changes.
    """
    sections: dict[str, str] = {}
    key, lines = "", []
    for line in text.splitlines(keepends=True):
        if line.startswith(level):
            if lines:
                sections[key] = "".join(lines)
            key, lines = line.rstrip("\n").split(":", 1)[0], []
        lines.append(line)
    if lines:
        sections[key] = "".join(lines)
    return sections
