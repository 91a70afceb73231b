"""Large synthetic run histories (issue 13): write one, then time ``gradwatch report`` on it and its peak RSS.

Nothing is committed but this generator: the files are hundreds of megabytes. The step lines are
built from a pool of pre-formatted per-parameter blocks (exactly the writer's format: 7
significant digits, ``"NaN"`` for non-finite values, ``null`` for a parameter without a gradient),
so writing 100k steps x 200 parameters takes seconds, not the minutes a real run would.

Usage::

    python -m benchmarks.history_scale write /tmp/big.jsonl --steps 100000 --params 200
    python -m benchmarks.history_scale measure /tmp/big.jsonl [--png /tmp/big.png]

``measure`` runs ``gradwatch report`` in a child process and prints its wall time and peak
resident memory (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``). On a shared machine the
wall time is indicative only; the peak memory is not affected by other load.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from gradwatch.history import HISTORY_FORMAT, HISTORY_VERSION

__all__ = ["write_history_file", "measure_report"]

_POOL = 64  # distinct per-parameter blocks, cycled through; enough that no two neighbours match


def _names(params: int) -> list[str]:
    """Parameter names shaped like a deep network's: ``blocks.<i>.<layer>.weight`` and ``.bias``."""
    names = []
    for i in range(params):
        block, leaf = divmod(i, 2)
        names.append(f"blocks.{block // 4}.layer{block % 4}.{'weight' if leaf == 0 else 'bias'}")
    return names


def write_history_file(
    path: str | Path,
    *,
    steps: int,
    params: int,
    seed: int = 0,
    nan_every: int = 0,
    sparse: bool = False,
    version: int = HISTORY_VERSION,
) -> Path:
    """Write a synthetic version-2 history of ``steps`` step lines over ``params`` parameters.

    Args:
        path: file to write.
        steps: step lines.
        params: watched parameters.
        seed: random seed of the values.
        nan_every: every ``nan_every``-th step has a NaN norm (with a nonfinite event); 0 for none.
        sparse: every other step leaves the last quarter of the parameters without a gradient (``null``).
        version: the header's schema version; 1 (without ``sparse``) makes a file older gradwatch reads,
            for before/after comparisons.

    Returns:
        The path written.
    """
    rng = random.Random(seed)
    names = _names(params)
    header = {
        "type": "header",
        "format": HISTORY_FORMAT,
        "version": version,
        "created": "2026-01-01T00:00:00+00:00",
        "names": names,
        "per_param": "all",
        "meta": {"synthetic": True},
    }
    blocks = []
    for _ in range(_POOL):
        norms = [float(f"{rng.lognormvariate(0, 1):.7g}") for _ in names]
        max_abs = [float(f"{n / rng.uniform(5, 50):.7g}") for n in norms]
        total = sum(n * n for n in norms) ** 0.5
        blocks.append((total, json.dumps(norms), json.dumps(max_abs)))
    zeros = json.dumps([0] * params)
    absent = params - params // 4
    sparse_tail = ",".join(["null"] * (params - absent))
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for step in range(steps):
            total, norms, max_abs = blocks[step % _POOL]
            nonfinite = zeros
            events = "[]"
            total_text = f"{total:.7g}"
            if sparse and step % 2:
                # Keep the first three quarters, the rest without a gradient this step.
                norms = "[" + ",".join(norms[1:-1].split(",")[:absent] + [sparse_tail]) + "]"
                max_abs = "[" + ",".join(max_abs[1:-1].split(",")[:absent] + [sparse_tail]) + "]"
                nonfinite = "[" + ",".join(["0"] * absent + [sparse_tail]) + "]"
            if nan_every and step % nan_every == nan_every - 1:
                norms = '["NaN",' + norms[1:].split(",", 1)[1]
                nonfinite = "[3," + nonfinite[1:].split(",", 1)[1]
                total_text = '"NaN"'
                events = (
                    f'[{{"step":{step},"kind":"nonfinite","param":"{names[0]}","value":3.0,'
                    '"threshold":null,"action":"skip"}]'
                )
            f.write(
                f'{{"type":"step","step":{step},"total_norm":{total_text},"loss":{2.0 + 1.0 / (step + 1):.7g},'
                f'"clip_factor":1.0,"skipped":{"true" if events != "[]" else "false"},"norms":{norms},'
                f'"max_abs":{max_abs},"nonfinite":{nonfinite},"events":{events}}}\n'
            )
    return path


def measure_report(path: str | Path, *, png: str | None = None, fail_on: str = "nonfinite") -> dict[str, float]:
    """Run ``gradwatch report`` on ``path`` in a child process; return its wall and CPU seconds, peak RSS, exit code."""
    argv = [sys.executable, "-m", "gradwatch", "report", str(path), "--quiet", "--fail-on", fail_on]
    if png:
        argv += ["--png", png]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    before, cpu_before = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_kib = usage.ru_maxrss  # kibibytes on Linux
    if peak_kib <= before:
        peak_kib = float("nan")  # an earlier child was larger; run measure once per process
    return {
        "seconds": seconds,
        "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before,  # less sensitive to a shared machine
        "peak_rss_mb": peak_kib / 1024,
        "exit_code": proc.returncode,
        "file_mb": Path(path).stat().st_size / 1e6,
        "stdout": proc.stdout.strip()[-300:],
        "stderr": proc.stderr.strip()[-300:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.history_scale", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write a synthetic history")
    write.add_argument("path")
    write.add_argument("--steps", type=int, default=100_000)
    write.add_argument("--params", type=int, default=200)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--nan-every", type=int, default=0)
    write.add_argument("--sparse", action="store_true", help="every other step: a quarter of the parameters null")
    write.add_argument("--version", type=int, default=HISTORY_VERSION, help="header version (1: readable by old code)")
    measure = sub.add_parser("measure", help="time gradwatch report on a history; print seconds and peak RSS")
    measure.add_argument("path")
    measure.add_argument("--png")
    args = parser.parse_args(argv)
    if args.command == "write":
        start = time.perf_counter()
        out = write_history_file(
            args.path,
            steps=args.steps,
            params=args.params,
            seed=args.seed,
            nan_every=args.nan_every,
            sparse=args.sparse,
            version=args.version,
        )
        print(f"wrote {out} ({out.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - start:.1f} s")
    else:
        result = measure_report(args.path, png=args.png)
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
