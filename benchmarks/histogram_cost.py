"""``python -m benchmarks.histogram_cost``: the statistics pass with log2 histograms against without.

Ratios in one run, round-robin, median of ``--repeats`` calls each: ``grad_stats_hist`` (statistics
and histograms in one read) and the torch way (``grad_stats`` for the statistics, then a float32
copy, ``log2`` and ``torch.histc`` per layer), each over the plain ``grad_stats`` pass, on
ResNet-50-shaped and GPT-2-small-shaped gradient lists in float32, bfloat16 and float16. The issue's target
is a ratio within 1.3x on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import gradwatch
import gradwatch._ops  # noqa: F401  (loads the extension: registers torch.ops.gradwatch.*)
from gradwatch._reference import LOG2_HIST_BINS, LOG2_HIST_MAX_EXP, LOG2_HIST_MIN_EXP

from .op_bench import gpt2_small_shapes, make_grads, resnet50_shapes


def torch_histograms(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """What a torch user writes for the same counts: a float32 copy, log2 and histc per layer.

    (Counts only the binades' interior: histc drops zeros, at -inf, and non-finite values.)
    """
    bins = LOG2_HIST_BINS - 3
    return [
        torch.histc(t.float().abs().log2(), bins=bins, min=LOG2_HIST_MIN_EXP + 1, max=LOG2_HIST_MAX_EXP) for t in ts
    ]


def methods(ts: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    return {
        "plain": lambda: torch.ops.gradwatch.grad_stats(ts),
        "hist": lambda: torch.ops.gradwatch.grad_stats_hist(ts),
        "torch": lambda: (torch.ops.gradwatch.grad_stats(ts), torch_histograms(ts)),
    }


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call; the slow torch way runs every fifth round only (at least 3 times)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():  # warm up
        fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            if name == "torch" and r % 5 and r >= 3:
                continue
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def run(repeats: int, quick: bool, device: torch.device) -> list[dict]:
    sets = {"ResNet-50": resnet50_shapes(), "GPT-2 small": gpt2_small_shapes()}
    if quick:
        sets = {name: shapes[:12] for name, shapes in sets.items()}
    rows = []
    for name, shapes in sets.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            ts = make_grads(shapes, device, dtype)
            t = time_round_robin(methods(ts), repeats, device)
            rows.append(
                {
                    "set": name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "elements": sum(x.numel() for x in ts),
                    "plain_ms": 1e3 * t["plain"],
                    "hist_ratio": t["hist"] / t["plain"],
                    "torch_ratio": t["torch"] / t["plain"],
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| gradients | dtype | plain pass (ms) | with histograms | torch way (stats + copy + histc per layer) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['set']} ({r['elements'] / 1e6:.1f}M) | {r['dtype']} | {r['plain_ms']:.1f} | "
            f"{r['hist_ratio']:.2f}x | {r['torch_ratio']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.histogram_cost", description=__doc__)
    parser.add_argument("--repeats", type=int, default=30, help="calls per method, round-robin (median kept)")
    parser.add_argument("--quick", action="store_true", help="the first 12 tensors of each set (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{where}, CPU kernel: {gradwatch.cpu_kernel_capability()}")
    print(markdown(run(args.repeats, args.quick, device)))


if __name__ == "__main__":
    main()
