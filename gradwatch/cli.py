"""Command line: ``gradwatch demo`` (the main job, end to end) and ``gradwatch report`` (summary, PNG, CI gate).

Exit codes: 0 success; 1 ``report --fail-on`` found gated anomalies; 2 bad usage or unusable input (no such
file, not a gradwatch history, a history with no steps, a newer history version, an unreadable line under
``--strict``, or the PNG could not be drawn).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .events import AnomalyKind

__all__ = ["main", "build_parser", "parse_kinds"]

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
KIND_CHOICES: tuple[str, ...] = (*(k.value for k in AnomalyKind), "any")


def parse_kinds(text: str) -> list[str]:
    """Parse a ``--fail-on`` value such as ``"nonfinite,spike"`` into anomaly kind names.

    Raises:
        argparse.ArgumentTypeError: a name is not an :class:`AnomalyKind` value or ``"any"``.
    """
    kinds = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not kinds:
        raise argparse.ArgumentTypeError(f"empty list {text!r}; choose from {', '.join(KIND_CHOICES)}")
    for kind in kinds:
        if kind not in KIND_CHOICES:
            raise argparse.ArgumentTypeError(f"unknown anomaly kind {kind!r}; choose from {', '.join(KIND_CHOICES)}")
    return kinds


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Build the ``gradwatch`` argument parser (subcommands ``demo`` and ``report``)."""
    from .demo import FAULTS, MODELS, DemoConfig

    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="gradwatch", description="Watch every gradient, every step: demo and run reports."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="train a ResNet twice, unprotected and with gradwatch, through an injected fault",
        description="Train the same seeded ResNet on FakeData twice, unprotected and under gradwatch, inject a "
        "fault at --fault-step, and compare. Writes OUT/history.jsonl and OUT/report.png.",
    )
    demo.add_argument("--model", choices=MODELS, default=defaults.model, help="torchvision model (default %(default)s)")
    demo.add_argument("--steps", type=_positive_int, default=defaults.steps, help="steps per run (default %(default)s)")
    demo.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size, help="default %(default)s")
    demo.add_argument("--image-size", type=_positive_int, default=defaults.image_size, help="default %(default)s")
    demo.add_argument("--fault-step", type=int, default=None, help="step of the fault (default: 3/4 of --steps)")
    demo.add_argument("--fault", choices=FAULTS, default=defaults.fault, help="what goes wrong (default %(default)s)")
    demo.add_argument("--fault-scale", type=float, default=defaults.fault_scale, help="default %(default)g")
    demo.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate (default %(default)g)")
    demo.add_argument(
        "--policy",
        type=lambda s: tuple(p.strip() for p in s.split(",") if p.strip()),
        default=defaults.policy,
        help="gradwatch policies for the protected run, comma-separated (default %(default)s)",
    )
    demo.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    demo.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1 ... (default %(default)s)")
    demo.add_argument("--out", default=defaults.out, help="output folder (default %(default)s)")
    demo.add_argument(
        "--warmup",
        type=_positive_int,
        default=None,
        help="detector warm-up steps (default: gradwatch's, capped at 2/3 of --fault-step)",
    )
    demo.add_argument(
        "--loss-sigma",
        type=float,
        default=defaults.loss_sigma,
        help="loss-spike z-score (default %(default)s: per-batch losses of a few images are noisy)",
    )
    demo.add_argument("--verbose", action="store_true", help="log every anomaly event while training")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    report = sub.add_parser(
        "report",
        help="summarize a run history, draw its PNG, and gate CI on anomalies",
        description="Summarize a run history written by gradwatch (history=... or the demo), optionally draw a "
        "PNG, and exit 1 if it has anomalies of the kinds given to --fail-on.",
    )
    report.add_argument("run_file", metavar="RUN_FILE", help="history .jsonl file, or a folder holding history.jsonl")
    report.add_argument("--png", metavar="PATH", help="write the report picture here")
    report.add_argument(
        "--underflow-format",
        choices=("fp16", "bf16", "fp8_e4m3", "fp8_e5m2"),
        default="fp16",
        help="format of the per-layer underflow heatmap (histories with log2 histograms; default fp16)",
    )
    report.add_argument(
        "--fail-on",
        type=parse_kinds,
        metavar="KINDS",
        help=f"exit 1 if the run has anomalies of these kinds (comma-separated: {', '.join(KIND_CHOICES)})",
    )
    report.add_argument("--top", type=int, default=5, help="worst steps to list (default %(default)s)")
    report.add_argument("--quiet", action="store_true", help="print only the --fail-on verdict")
    report.add_argument(
        "--strict",
        action="store_true",
        help="refuse a history with unreadable lines (exit 2) instead of skipping them with a warning",
    )
    report.set_defaults(func=_cmd_report)

    calibrate = sub.add_parser(
        "calibrate",
        help="write detector baseline statistics from a healthy run's history",
        description="Read a healthy run's history and write the detector's baseline statistics (per-parameter "
        "and total log-norm mean/variance, loss mean/variance) for GradWatch(..., baseline=PATH), which arms every "
        "adaptive rule from step 0 of a new run.",
    )
    calibrate.add_argument("run_file", metavar="HISTORY", help="history .jsonl file, or a folder holding history.jsonl")
    calibrate.add_argument("-o", "--output", required=True, metavar="PATH", help="baseline file to write (.pt)")
    calibrate.add_argument("--steps", type=_step_range, default=(None, None), metavar="FIRST:LAST", help="step range")
    calibrate.set_defaults(func=_cmd_calibrate)
    return parser


def _step_range(text: str) -> tuple[int | None, int | None]:
    first, sep, last = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(first) if first.strip() else None, int(last) if last.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST:LAST (either may be empty), got {text!r}") from None


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .baseline import calibrate, save_baseline
    from .history import read_history

    path = Path(args.run_file)
    history = read_history(path / "history.jsonl" if path.is_dir() else path)
    try:
        baseline = calibrate(history.steps, args.steps)
    except ValueError as error:
        print(f"gradwatch calibrate: {error}", file=sys.stderr)
        return 2
    save_baseline(baseline, args.output)
    first, last = baseline["steps"]
    print(
        f"baseline of {len(baseline['names'])} parameters from {int(baseline['total']['count'][0])} healthy steps "
        f"({first}..{last}) written to {args.output}"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_table, run_demo

    config = DemoConfig(
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        image_size=args.image_size,
        fault_step=args.fault_step,
        fault=args.fault,
        fault_scale=args.fault_scale,
        lr=args.lr,
        policy=tuple(args.policy),
        seed=args.seed,
        device=args.device,
        out=args.out,
        progress=not args.no_progress,
        warmup=args.warmup,
        loss_sigma=args.loss_sigma,
        verbose=args.verbose,
    )
    try:
        config.validate()
    except ValueError as error:
        print(f"gradwatch demo: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    result = run_demo(config)
    print()
    print(format_table(result))
    print()
    print(f"run history: {result.history_path}")
    if result.report_path is not None:
        print(f"report:      {result.report_path}")
    print(f"next:        gradwatch report {result.history_path} --png {Path(config.out) / 'report.png'}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from .history import HistoryError
    from .report import anomaly_counts, build_report, format_summary, reading_notes

    path = Path(args.run_file)
    if path.is_dir():
        path = path / "history.jsonl"
    if args.top < 0:
        print(f"gradwatch report: error: --top must be >= 0; got {args.top}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summary, written = build_report(
            path, top=args.top, png=args.png, strict=args.strict, underflow_format=args.underflow_format
        )
    except (FileNotFoundError, HistoryError, ImportError) as error:
        print(f"gradwatch report: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:  # unreadable file, or the PNG cannot be written
        print(f"gradwatch report: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # never a traceback from the gate: name the problem, exit "unusable"
        print(f"gradwatch report: error: could not report on {path}: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_USAGE
    if not args.quiet:
        print(format_summary(summary))
        if written is not None:
            print(f"\nwrote {written}")
    notes = reading_notes(summary)
    noted = f" ({'; '.join(notes)})" if notes else ""
    if summary.steps == 0:
        print(f"gradwatch report: error: {path} holds no steps{noted}; nothing to report or gate on", file=sys.stderr)
        return EXIT_USAGE
    if args.fail_on:
        found = anomaly_counts(summary, args.fail_on)
        gate = ",".join(args.fail_on)
        if found:
            detail = ", ".join(f"{kind} x{n}" for kind, n in sorted(found.items()))
            first = min(summary.first_step_of[k] for k in found)
            print(f"FAIL (--fail-on {gate}): {detail}; first at step {first}{noted}")
            return EXIT_GATE_FAILED
        print(f"PASS (--fail-on {gate}): no such anomalies in {summary.steps} steps{noted}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradwatch`` command line.

    Args:
        argv: arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        The exit code: 0 success, 1 ``--fail-on`` gate failed, 2 usage error or unusable input.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits on --help (0) and on usage errors (2)
        return int(exit_.code or 0)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
