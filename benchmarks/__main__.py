"""Command line of the overhead suite: ``python -m benchmarks [--quick] [--workloads ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .methods import METHODS
from .overhead import SuiteConfig, run_suite, update_results_md, write_outputs
from .workloads import WORKLOADS

_HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Gradient-monitoring overhead, side by side: step time, monitoring time, host reads/syncs, ops.",
    )
    parser.add_argument("--quick", action="store_true", help="CI smoke size: tiny models, 2 repeats")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="default: all available")
    parser.add_argument("--out", type=Path, default=_HERE / "results", help="where JSON, markdown and PNG go")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--rounds", type=int, help="round-robin rounds of whole-step timing")
    parser.add_argument("--alone-rounds", type=int, help="round-robin rounds of monitoring-alone timing")
    parser.add_argument(
        "--results-md",
        type=Path,
        help="markdown file to update (default: benchmarks/RESULTS.md for a full run, none for --quick)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: rewrite the markdown, chart (and --results-md) from a saved JSON",
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
        paths = write_outputs(results, args.out)
        if args.results_md is not None:
            update_results_md(results, args.results_md)
        print(paths["md"].read_text())
        return 0
    if args.threads is not None:
        # One thread keeps a smoke run fast on a shared machine: OpenMP threads spin-wait badly when oversubscribed.
        torch.set_num_threads(args.threads)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    config = SuiteConfig.for_mode(
        device,
        args.quick,
        workloads=args.workloads,
        methods=args.methods,
        rounds=args.rounds,
        alone_rounds=args.alone_rounds,
        progress=not args.no_progress,
    )
    results = run_suite(config)
    paths = write_outputs(results, args.out)
    results_md = args.results_md or (None if args.quick else _HERE / "RESULTS.md")
    if results_md is not None:
        update_results_md(results, results_md)
        paths["results_md"] = results_md
    print(paths["md"].read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
