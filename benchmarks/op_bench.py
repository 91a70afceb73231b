"""Fused grad_stats against what torch users write for the same statistics (issue 2).

Run: ``python -m benchmarks.op_bench [--device cuda] [--repeats 30] [--quick]``. Methods run
interleaved (round-robin per repeat), so machine noise hits all of them alike; the table reports
medians and ratios to gradwatch. Also reports the accuracy of each norm against float64.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import gradwatch

INF = float("inf")


def resnet50_shapes() -> list[tuple[int, ...]]:
    import torchvision

    return [tuple(p.shape) for p in torchvision.models.resnet50().parameters()]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (ctx, d)] + block * layers + [(d,), (d,)]


def llama8b_shapes(layers: int = 32) -> list[tuple[int, ...]]:
    """Llama-3-8B parameter shapes (GQA, 8 KV heads); ``layers`` < 32 scales it down to fit."""
    d, kv, ffn, vocab = 4096, 1024, 14336, 128256
    block = [(d, d), (kv, d), (kv, d), (d, d), (ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    return [(vocab, d)] + block * layers + [(d,), (vocab, d)]


def llama_layers_that_fit(device: torch.device) -> int:
    """Layers of the Llama-8B set whose bf16 gradients, and their flat copy, use under half the free memory."""
    per_layer = 2 * sum(math.prod(s) for s in llama8b_shapes(1)[1:-2])
    fixed = 2 * 2 * 128256 * 4096
    free = torch.cuda.mem_get_info(device)[0] // 2 // 2  # gradients + the flat copy of the ceiling
    return max(1, min(32, (free - fixed) // per_layer))


def host_microseconds(device: torch.device, counts=(100, 1000, 10000), repeats: int = 200) -> dict[int, float]:
    """Host time per grad_stats call (no sync) with a cached plan, by number of tensors."""
    out = {}
    for n in counts:
        ts = [torch.randn(64, device=device) for _ in range(n)]
        torch.ops.gradwatch.grad_stats(ts)  # builds and caches the plan
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.ops.gradwatch.grad_stats(ts)
        out[n] = (time.perf_counter() - start) / repeats * 1e6
        torch.cuda.synchronize(device)
    return out


def tiny_shapes(n: int = 2000) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(0)
    return [(int(k),) for k in torch.randint(1, 256, (n,), generator=g)]


def make_grads(shapes, device, dtype=torch.float32) -> list[torch.Tensor]:
    # Generated where they live: billions of elements (the Llama set) would take minutes on the host.
    g = torch.Generator(device).manual_seed(0)
    # Gradient-like magnitudes: small values with a per-tensor scale spread over orders of magnitude.
    return [
        (torch.randn(s, generator=g, device=device) * 10 ** (-4 + 3 * torch.rand(1, generator=g, device=device))).to(
            dtype
        )
        for s in shapes
    ]


def all_stats_torch(ts: list[torch.Tensor]):
    """What a torch user writes for the same four statistics."""
    norms = torch.stack(torch._foreach_norm(ts))
    max_abs = torch.stack(torch._foreach_norm(ts, INF))
    nonfinite = torch.stack([(~torch.isfinite(t)).sum() for t in ts])
    return norms, max_abs, nonfinite, torch.linalg.vector_norm(norms)


def methods(ts: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    flat = torch.cat([t.reshape(-1) for t in ts])  # same bytes, one buffer: the read ceiling
    return {
        "gradwatch.grad_stats (4 stats)": lambda: torch.ops.gradwatch.grad_stats(ts),
        "torch composite (4 stats)": lambda: all_stats_torch(ts),
        "_foreach_norm L2 only": lambda: torch.stack(torch._foreach_norm(ts)),
        "per-tensor .norm() loop": lambda: [t.norm() for t in ts],
        "flat sum() ceiling": lambda: flat.sum(),
    }


def time_methods(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():  # warm up
        fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def accuracy(ts: list[torch.Tensor]) -> dict[str, float]:
    exact = torch.stack([t.double().square().sum().sqrt() for t in ts])
    ours = torch.ops.gradwatch.grad_stats(ts)[:-1, 0]
    foreach = torch.stack(torch._foreach_norm(ts)).double()
    rel = lambda x: ((x - exact).abs() / exact.clamp_min(1e-300)).max().item()  # noqa: E731
    return {"gradwatch max rel. error": rel(ours), "_foreach_norm max rel. error": rel(foreach)}


def run(device: str, repeats: int, quick: bool) -> dict:
    dev = torch.device(device)
    sets = {"ResNet-50": resnet50_shapes, "GPT-2 small (124M)": gpt2_small_shapes, "2,000 tiny": tiny_shapes}
    if quick:
        sets = {"ResNet-50": resnet50_shapes, "2,000 tiny": tiny_shapes}
    results = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cpu_kernel": gradwatch.cpu_kernel_capability(),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "sets": {},
    }
    dtypes = dict.fromkeys(sets, torch.float32)
    if dev.type == "cuda" and not quick:
        layers = llama_layers_that_fit(dev)
        name = f"Llama-8B bf16 ({layers} of 32 layers)"
        sets[name] = lambda: llama8b_shapes(layers)
        dtypes[name] = torch.bfloat16
        results["host_us_per_call"] = host_microseconds(dev)
    for set_name, shapes_fn in sets.items():
        ts = make_grads(shapes_fn(), dev, dtypes[set_name])
        times = time_methods(methods(ts), repeats, dev)
        nbytes = sum(t.numel() * t.element_size() for t in ts)
        results["sets"][set_name] = {
            "tensors": len(ts),
            "elements": sum(t.numel() for t in ts),
            "times_s": times,
            "bandwidth_GBps": {k: nbytes / v / 1e9 for k, v in times.items()},
            "accuracy": accuracy(ts),
        }
        del ts
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


def markdown(results: dict) -> str:
    lines = [
        f"Device: {results['device']}, torch {results['torch']}, CPU kernel {results['cpu_kernel']}, "
        f"{results['threads']} threads, median of {results['repeats']} interleaved repeats.",
        "",
    ]
    for set_name, r in results["sets"].items():
        base = r["times_s"]["gradwatch.grad_stats (4 stats)"]
        lines += [
            f"**{set_name}** ({r['tensors']} tensors, {r['elements'] / 1e6:.1f}M elements)",
            "",
            "| method | median ms | time / gradwatch | GB/s |",
            "|---|---:|---:|---:|",
        ]
        for name, t in r["times_s"].items():
            lines.append(f"| {name} | {t * 1e3:.3f} | {t / base:.2f}x | {r['bandwidth_GBps'][name]:.1f} |")
        acc = r["accuracy"]
        lines += [
            "",
            f"Norm accuracy vs float64: gradwatch {acc['gradwatch max rel. error']:.1e}, "
            f"_foreach_norm {acc['_foreach_norm max rel. error']:.1e} (max relative error over tensors).",
            f"gradwatch at {r['times_s']['flat sum() ceiling'] / base:.0%} of a flat sum() over the same bytes.",
            "",
        ]
    if "host_us_per_call" in results:
        per = ", ".join(f"{n} tensors {us:.0f} us" for n, us in results["host_us_per_call"].items())
        lines += [f"Host time per grad_stats call with a cached plan (no sync): {per}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="fewer sets and repeats (CI smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    results = run(args.device, 3 if args.quick else args.repeats, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"op_bench_{args.device}.json").write_text(json.dumps(results, indent=2))
    text = markdown(results)
    (args.out / f"op_bench_{args.device}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
