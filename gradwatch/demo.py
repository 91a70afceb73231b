"""The demo: the same seeded ResNet training twice, unprotected and under gradwatch, with a fault injected.

At ``fault_step`` one batch is corrupted: by default its per-sample loss weights are garbage
(``fault_scale`` = 1e5 instead of 1, as a corrupted sample-weight column or a loss that missed its
mixed-precision unscale would give), so its gradients are ~10^5 times too large. The unprotected
run takes that step and its loss goes from ~2 to thousands and stays there; the protected run sees
the spike in the gradient statistics and applies its policy (``skip`` by default) and trains on.

Data is :class:`torchvision.datasets.FakeData` (no download) with a per-class colour shift added
so that there is something to learn. Run it as ``gradwatch demo`` or ``python -m gradwatch demo``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .events import AnomalyEvent
from .history import HistoryWriter, encode_float, read_history
from .summary import badness_of, fmt

if TYPE_CHECKING:  # torch is imported where the demo runs, so `gradwatch report` never loads it
    import torch
    from torch import nn

__all__ = ["DemoConfig", "DemoResult", "RunResult", "run_demo", "format_table"]

logger = logging.getLogger("gradwatch")

Fault = Literal["corrupt_batch", "nan_batch", "lr_spike"]
FAULTS: tuple[str, ...] = ("corrupt_batch", "nan_batch", "lr_spike")
MODELS: tuple[str, ...] = ("resnet18", "resnet50")


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo`; the defaults finish in a few minutes on 2 CPU cores.

    Attributes:
        model: ``"resnet18"`` or ``"resnet50"`` (torchvision, randomly initialized).
        steps: optimizer steps per run.
        batch_size: images per batch.
        image_size: height and width of the square FakeData images.
        num_classes: classes of the FakeData labels.
        fault_step: step at which the fault is injected (0-based); None means 3/4 of ``steps``.
        fault: ``"corrupt_batch"`` (loss weights x ``fault_scale``), ``"nan_batch"`` (NaN pixels in
            one image) or ``"lr_spike"`` (learning rate x ``fault_scale`` for one step; gradients
            are normal at that step, so only a ``"rollback"`` policy can undo it).
        fault_scale: size of the corruption.
        lr: SGD learning rate (momentum 0.9).
        policy: gradwatch policy names for the protected run, composed in order.
        seed: seeds model initialization and data; both runs are identical up to the fault.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        out: folder for ``history.jsonl`` and ``report.png``.
        progress: show tqdm progress bars.
        warmup: detector warm-up steps; None uses gradwatch's default (50) but at most 2/3 of
            ``fault_step``, so that the adaptive rules are armed when the fault comes.
        loss_sigma: loss-spike z-score of the protected run. The loss of a batch of a few images
            is noisy (it can jump 10x between batches), so the demo uses 20 rather than
            gradwatch's default 6; the fault's ~10^5 jump is caught either way.
        verbose: let gradwatch log every anomaly event while training (one line per parameter).
        detector_options: extra keyword arguments for :class:`gradwatch.GradWatch`.
    """

    model: str = "resnet18"
    steps: int = 80
    batch_size: int = 16
    image_size: int = 64
    num_classes: int = 10
    fault_step: int | None = None
    fault: Fault = "corrupt_batch"
    fault_scale: float = 1e5
    lr: float = 0.01
    policy: tuple[str, ...] = ("skip",)
    seed: int = 0
    device: str = "auto"
    out: str = "runs/demo"
    progress: bool = True
    warmup: int | None = None
    loss_sigma: float | None = 20.0
    verbose: bool = False
    detector_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid setting."""
        if self.model not in MODELS:
            raise ValueError(f"demo: model must be one of {MODELS}; got {self.model!r}")
        if self.fault not in FAULTS:
            raise ValueError(f"demo: fault must be one of {FAULTS}; got {self.fault!r}")
        for name in ("steps", "batch_size", "image_size", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"demo: {name} must be a positive int; got {value!r}")
        if self.image_size < 16:
            raise ValueError(f"demo: image_size must be at least 16 for a ResNet; got {self.image_size}")
        if self.fault_step is None:
            self.fault_step = self.steps * 3 // 4
        if not isinstance(self.fault_step, int) or not 0 < self.fault_step < self.steps - 1:
            raise ValueError(
                f"demo: fault_step must be between 1 and steps - 2 = {self.steps - 2}; got {self.fault_step}"
            )
        if not self.lr > 0:
            raise ValueError(f"demo: lr must be positive; got {self.lr!r}")
        if not self.policy:
            raise ValueError("demo: policy is empty; name at least one policy, e.g. 'skip'")


@dataclass
class RunResult:
    """One training run of the demo.

    Attributes:
        label: ``"unprotected"`` or ``"gradwatch"``.
        losses: the loss of every step (the fault step's loss includes the corruption).
        step_seconds: wall time of every step.
        events: anomalies gradwatch detected (empty for the unprotected run).
        detected_step: first step with an anomaly, if any.
        layer: the parameter the first anomaly names (or the largest gradient at that step).
        action: what the policy did at ``detected_step``.
    """

    label: str
    losses: list[float]
    step_seconds: list[float]
    events: list[AnomalyEvent] = field(default_factory=list)
    detected_step: int | None = None
    layer: str | None = None
    action: str | None = None

    @property
    def final_loss(self) -> float:
        """Mean loss of the last (up to) 5 steps: per-batch losses of a few images are noisy."""
        return _mean(self.losses[-5:])

    def seconds_per_step(self, skip: int = 3) -> float:
        """Median step time, leaving out the first ``skip`` (warm-up) steps."""
        times = sorted(self.step_seconds[skip:] or self.step_seconds)
        return times[len(times) // 2]


@dataclass
class DemoResult:
    """Both runs of the demo and the files written."""

    config: DemoConfig
    device: str
    unprotected: RunResult
    protected: RunResult
    history_path: Path
    report_path: Path | None

    @property
    def overhead(self) -> float:
        """Protected over unprotected median step time, minus 1."""
        return self.protected.seconds_per_step() / self.unprotected.seconds_per_step() - 1.0

    def diverged(self, run: RunResult) -> bool:
        """Whether a run's final loss is non-finite or over 10x its mean loss over the 5 steps before the fault."""
        reference = max(abs(_mean(run.losses[max(0, self.config.fault_step - 5) : self.config.fault_step])), 1.0)
        return not math.isfinite(run.final_loss) or run.final_loss > 10 * reference


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _build_model(config: DemoConfig) -> nn.Module:
    try:
        import torchvision
    except ImportError as error:
        raise ImportError('gradwatch demo needs torchvision; install it with pip install "gradwatch[dev]"') from error
    builder = getattr(torchvision.models, config.model)
    return builder(weights=None, num_classes=config.num_classes)


def _make_batches(config: DemoConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Materialize every batch once so both runs see identical data and data loading is not timed."""
    import torch
    import torchvision
    from torchvision import transforms

    size = config.image_size
    data = torchvision.datasets.FakeData(
        size=config.steps * config.batch_size,
        image_size=(3, size, size),
        num_classes=config.num_classes,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.25,) * 3)]),
        random_offset=config.seed * 1_000_003,
    )
    generator = torch.Generator().manual_seed(config.seed)
    # FakeData labels are random; a per-class colour shift gives the network something to learn.
    colours = torch.randn(config.num_classes, 3, 1, 1, generator=generator)
    loader = torch.utils.data.DataLoader(data, batch_size=config.batch_size, shuffle=False)
    return [(x + colours[y], y) for x, y in loader]


def _train(
    config: DemoConfig,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    protect: bool,
    history: HistoryWriter | None = None,
) -> RunResult:
    import torch
    import torch.nn.functional as F

    label = "gradwatch" if protect else "unprotected"
    torch.manual_seed(config.seed)
    model = _build_model(config).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    watch = None
    if protect:
        from .monitor import GradWatch

        policy: Any = config.policy[0] if len(config.policy) == 1 else list(config.policy)
        warmup = config.warmup if config.warmup is not None else max(1, min(50, config.fault_step * 2 // 3))
        options = {"warmup": warmup, "loss_sigma": config.loss_sigma, **config.detector_options}
        watch = GradWatch(model, optimizer, policy=policy, sinks=[history] if history else (), **options)
    bar = None
    if config.progress:
        try:
            from tqdm.auto import tqdm
        except ImportError as error:
            raise ImportError(
                'gradwatch demo: the progress bar needs tqdm; pip install "gradwatch[report]" or pass --no-progress'
            ) from error
        bar = tqdm(total=config.steps, desc=f"{label:>11}", unit="step", leave=True, dynamic_ncols=True)
    losses: list[float] = []
    seconds: list[float] = []
    model.train()
    try:
        for step, (x, y) in enumerate(batches):
            start = time.perf_counter()
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            weights = torch.ones(len(y), device=device)
            lr = config.lr
            if step == config.fault_step:
                if config.fault == "corrupt_batch":
                    weights.fill_(config.fault_scale)
                elif config.fault == "nan_batch":
                    x = x.clone()
                    x[0, :, : max(1, x.shape[2] // 8), : max(1, x.shape[3] // 8)] = float("nan")
                else:
                    lr = config.lr * config.fault_scale
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = (F.cross_entropy(model(x), y, reduction="none") * weights).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if watch is not None:
                watch.observe_loss(loss)
            optimizer.step()
            # The demo shows every loss, so it reads it back; the monitor itself never does.
            value = loss.item()
            seconds.append(time.perf_counter() - start)
            losses.append(value)
            if bar is not None:
                bar.set_postfix_str(f"loss {value:.4g}", refresh=False)
                bar.update()
    finally:
        if bar is not None:
            bar.close()
        if watch is not None:
            watch.flush()
            watch.remove()
    result = RunResult(label=label, losses=losses, step_seconds=seconds)
    if watch is not None:
        result.events = list(watch.events)
        _describe_detection(result, history)
    return result


def _describe_detection(result: RunResult, history: HistoryWriter | None) -> None:
    acted = [e for e in result.events if e.action != "none"]
    if not acted:
        return
    first = min(e.step for e in acted)
    at_first = [e for e in acted if e.step == first]
    named = [e for e in at_first if e.param is not None]
    result.detected_step = first
    result.action = ",".join(sorted({e.action for e in at_first}))
    if named:
        worst = max(named, key=lambda e: badness_of(e.value))
        result.layer = f"{worst.param} ({worst.kind.value})"
    elif history is not None:
        # Only global statistics fired (total norm, loss): name the largest gradient of that step.
        record = next((r for r in read_history(history.path).steps if r.step == first), None)
        if record is not None and record.norms:
            i = max(range(len(record.norms)), key=lambda j: -math.inf if record.norms[j] is None else record.norms[j])
            result.layer = f"{record.names[i]} ({at_first[0].kind.value})"
    if result.layer is None:
        result.layer = f"<global> ({at_first[0].kind.value})"


def run_demo(config: DemoConfig | None = None) -> DemoResult:
    """Run the demo: train unprotected, then under gradwatch, and write the history and report.

    Args:
        config: settings; defaults to :class:`DemoConfig`'s.

    Returns:
        A :class:`DemoResult`; :func:`format_table` renders it.

    Raises:
        ValueError: a setting is invalid (the message names it).
        ImportError: torchvision (or tqdm with ``progress=True``) is missing.
    """
    config = config or DemoConfig()
    config.validate()
    device = _resolve_device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    logger.info(
        "gradwatch demo: %s on %s, %d steps, fault %s at step %d",
        config.model,
        device,
        config.steps,
        config.fault,
        config.fault_step,
    )
    batches = _make_batches(config)
    unprotected = _train(config, batches, device, protect=False)
    quiet = not config.verbose and logger.getEffectiveLevel() <= logging.WARNING
    saved_level = logger.level
    if quiet:  # one warning per flagged parameter would bury the progress bar; the table sums them up
        logger.setLevel(logging.ERROR)
    history_path = out / "history.jsonl"
    meta = {"demo": {k: v for k, v in asdict(config).items() if k != "detector_options"}, "device": str(device)}
    with HistoryWriter(history_path, meta=meta) as writer:
        try:
            protected = _train(config, batches, device, protect=True, history=writer)
        finally:
            if quiet:
                logger.setLevel(saved_level)
        result = DemoResult(config, str(device), unprotected, protected, history_path, None)
        writer.write_summary(
            overhead=result.overhead,
            seconds_per_step=protected.seconds_per_step(),
            baseline_loss={
                "label": "unprotected loss",
                "steps": list(range(len(unprotected.losses))),
                "loss": [encode_float(x) for x in unprotected.losses],
            },
        )
    try:
        from .report import plot_report

        result.report_path = plot_report(
            history_path,
            out / "report.png",
            title=f"gradwatch demo: {config.model}, {config.fault} at step {config.fault_step}, "
            f"policy {'+'.join(config.policy)}",
        )
    except ImportError as error:
        logger.warning("gradwatch demo: no report.png (%s)", error)
    return result


def _fmt(x: float | None) -> str:
    return fmt(x, ".3e" if x is not None and abs(x) >= 1e5 else ".4g")  # exponent from 1e5: columns stay narrow


def format_table(result: DemoResult) -> str:
    """Render the side-by-side comparison of the two runs as text."""
    config = result.config
    f = config.fault_step
    last = config.steps - 1
    u, p = result.unprotected, result.protected
    rows = [
        ("", "unprotected", f"gradwatch ({'+'.join(config.policy)})"),
        (
            f"loss before fault (mean, steps {max(0, f - 5)}-{f - 1})",
            _fmt(_mean(u.losses[max(0, f - 5) : f])),
            _fmt(_mean(p.losses[max(0, f - 5) : f])),
        ),
        (f"loss at fault step ({f})", _fmt(u.losses[f]), _fmt(p.losses[f])),
        (f"loss after fault (step {f + 1})", _fmt(u.losses[f + 1]), _fmt(p.losses[f + 1])),
        ("anomaly acted on at step", "-", "-" if p.detected_step is None else str(p.detected_step)),
        ("layer", "-", p.layer or "-"),
        ("action taken", "none", p.action or "-"),
        (f"final loss (mean, steps {max(0, last - 4)}-{last})", _fmt(u.final_loss), _fmt(p.final_loss)),
        ("anomaly events (all steps)", "-", str(len(p.events))),
        ("diverged", "yes" if result.diverged(u) else "no", "yes" if result.diverged(p) else "no"),
        ("time per step", f"{u.seconds_per_step() * 1e3:.0f} ms", f"{p.seconds_per_step() * 1e3:.0f} ms"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        f"gradwatch demo: {config.model} on {result.device}, {config.steps} steps of {config.batch_size} "
        f"{config.image_size}x{config.image_size} FakeData images, fault '{config.fault}' at step {f}",
        "",
    ]
    for i, row in enumerate(rows):
        lines.append(f"  {row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}")
        if i == 0:
            lines.append("  " + "-" * (sum(widths) + 4))
    return "\n".join(lines)
