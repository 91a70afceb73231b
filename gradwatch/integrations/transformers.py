"""Hugging Face ``Trainer`` callback: gradwatch on the gradients as backward leaves them, before clipping.

Needs ``transformers`` (5.x) and ``accelerate`` (``pip install "gradwatch[transformers]"``).

Where the ``Trainer`` (5.x) runs an optimizer step, after the last micro-batch's backward, it does::

    accelerator.backward(loss)             # last micro-batch: gradients complete (and DDP-synced)
    accelerator.clip_grad_norm_(...)       # max_grad_norm: scales every gradient, returns the pre-clip norm
    callbacks.on_pre_optimizer_step        # <- the gradients are already clipped here
    optimizer.step()                       # <- and in the optimizer's step pre-hooks
    callbacks.on_optimizer_step
    if not accelerator.optimizer_step_was_skipped: lr_scheduler.step()

A monitor checking in ``on_pre_optimizer_step`` or an optimizer step pre-hook would see clipped
gradients, where a spike clipped to ``max_grad_norm`` looks healthy. This callback measures at the
end of the last micro-batch's backward pass instead: a post-accumulate-grad hook on the watched
parameters queues one autograd end-of-backward callback, which re-queues itself once so it runs
after the callbacks that distributed wrappers (DDP, FSDP2) queue during backward to finish their
gradient reduction. There, on the step's complete gradients and before ``clip_grad_norm_``, it
feeds the step's loss and runs :meth:`gradwatch.GradWatch.check`: measure, detect, decide, act.

Acting: clip/zero factors are applied right away (so ``zero`` clears a NaN gradient before the
``Trainer``'s clipping could spread it to every gradient); a ``skip`` is carried out by the
optimizer step itself (fused optimizers, the ``Trainer``'s default ``adamw_torch_fused``: on the
device through ``found_inf``; others: the gradients are set aside in ``on_pre_optimizer_step``,
after the ``Trainer`` has clipped and logged them, and put back after the step). Then the callback tells
``accelerate`` the step was skipped, so ``Trainer`` does not advance the learning-rate scheduler,
exactly as for a ``GradScaler`` overflow. Knowing that on the host costs one sync per optimizer
step, and only when the policy can skip.

Example:
    >>> from gradwatch.integrations.transformers import GradWatchCallback  # doctest: +SKIP
    >>> callback = GradWatchCallback(policy="skip", history="runs/history.jsonl")  # doctest: +SKIP
    >>> Trainer(model, args, train_dataset=data, callbacks=[callback]).train()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..events import AnomalyEvent, StepRecord
from ..layers import LayerNorms
from ..monitor import GradWatch

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "gradwatch: the Trainer callback needs transformers and accelerate; "
        'install them with pip install "gradwatch[transformers]"'
    ) from error

__all__ = ["GradWatchCallback", "STATE_FILE"]

logger = logging.getLogger("gradwatch")

STATE_FILE = "gradwatch_state.pt"
"""Name of the monitor's state file in each ``checkpoint-N`` folder."""


def _inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside accelerate's ``AcceleratedOptimizer`` wrapper(s)."""
    inner = optimizer
    # AcceleratedOptimizer subclasses torch.optim.Optimizer without its state: unwrap to the real one.
    while getattr(inner, "optimizer", None) is not None and inner.optimizer is not inner:
        inner = inner.optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(
            f"GradWatchCallback: the Trainer's optimizer {type(optimizer).__name__} holds no torch.optim.Optimizer; "
            "gradwatch needs one to act at the step"
        )
    return inner


def _loss_of(output: Any) -> torch.Tensor | None:
    """The scalar ``loss`` of a model output (``ModelOutput``, dict or tuple-free object), else None."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.detach().reshape(()).float()
    return None


class GradWatchCallback(TrainerCallback):
    """Watches every gradient of the ``Trainer``'s model each optimizer step, before the ``Trainer`` clips.

    Takes the options of :class:`gradwatch.GradWatch`; the model and optimizer are the
    ``Trainer``'s, attached when training begins.

    What is measured where:

    * gradients: at the end of the backward pass of the last micro-batch of each optimizer step
      (accumulated over the micro-batches, DDP-synced), before ``max_grad_norm`` clipping; on
      healthy steps the total norm equals the ``grad_norm`` the ``Trainer`` logs;
    * loss: the step's loss as the ``Trainer`` counts it, from each micro-batch's model output
      ``loss`` (a forward hook, device ops only): their sum where the ``Trainer`` passes
      ``num_items_in_batch`` (each is then normalized by the whole step's item count), else their
      mean. NaN included: ``logging_nan_inf_filter`` hides NaN losses from the ``Trainer``'s
      logged loss, not from gradwatch's records;
    * step numbers: gradwatch's step is the ``Trainer``'s ``state.global_step`` while that step
      runs (0-based; the ``Trainer`` logs it as ``global_step`` + 1 after the step).

    Logging: in ``on_log`` the latest drained record is added to the ``Trainer``'s logs as
    ``{prefix}/total_norm``, ``{prefix}/clip_factor``, ``{prefix}/loss``, ``{prefix}/norm/{layer}`` (``log_layers``),
    plus ``{prefix}/anomalies`` and ``{prefix}/skipped`` counted since the previous log, all from
    the monitor's asynchronous host copies (no sync). Callbacks after this one and
    ``trainer.state.log_history`` see them; ``report_to`` loggers, which the ``Trainer`` places
    before user callbacks, see them once this callback is moved ahead of them.

    Checkpoints: ``on_save`` writes the monitor's state to ``checkpoint-N/gradwatch_state.pt``;
    when training resumes at step N it is read back from ``output_dir/checkpoint-N`` (or
    ``args.resume_from_checkpoint``), so detection stays armed across the restart.

    Args:
        policy: gradwatch policy name(s) or objects, as for :class:`gradwatch.GradWatch`.
        history: path of a run history file to write, or None.
        log_layers: add per-layer gradient norms to the ``Trainer``'s logs.
        prefix: metric name prefix.
        **options: more :class:`gradwatch.GradWatch` keyword arguments (``include``, ``exclude``,
            ``every``, ``sinks``, detector options such as ``warmup``, ``sigma`` or ``max_norm``).

    Attributes:
        watch: the monitor, built in ``on_train_begin`` (detached, but kept, after training).
        events: every anomaly event seen (kept after training).
        records: how many step records were drained.

    Raises:
        ValueError: (at ``on_train_begin``) ``fp16`` mixed precision: its ``GradScaler`` scales the
            gradients that backward leaves, so they cannot be measured there; use ``bf16``.
    """

    def __init__(
        self,
        *,
        policy: Any = "warn",
        history: Any = None,
        log_layers: bool = True,
        prefix: str = "gradwatch",
        **options: Any,
    ) -> None:
        if "measure_in_backward" in options:
            raise ValueError(
                "GradWatchCallback: measure_in_backward is not supported (the Trainer's clipping changes gradients "
                "after backward); remove it"
            )
        self.policy = policy
        self.history = history
        self.log_layers = log_layers
        self.prefix = prefix.rstrip("/")
        self.options = options
        self.watch: GradWatch | None = None
        self.events: list[AnomalyEvent] = []
        self.records = 0
        self._layer_norms = LayerNorms()
        self._handles: list[Any] = []
        self._accelerated: Any = None  # accelerate's optimizer wrapper: its step_was_skipped feeds the scheduler
        self._gradient_state: Any = None
        self._queued = False
        self._checked_step: int | None = None  # Trainer global_step whose check has run
        self._global_step = 0
        self._losses: list[torch.Tensor] = []  # this step's micro-batch output losses, on the device
        self._loss_is_share = False
        self._host_skip = False  # this step's skip is carried out at on_pre_optimizer_step
        self._latest: StepRecord | None = None
        self._since_log = {"anomalies": 0, "skipped": 0}
        self._skipped_steps: set[int] = set()
        self._marked_skip: tuple[bool] | None = None  # the wrapper's own flag, while we override it
        self._warned_late = False

    # ----------------------------------------------------------------------------- attach

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Build the monitor on the ``Trainer``'s model and optimizer; restore its state when resuming."""
        if getattr(args, "fp16", False):
            raise ValueError(
                "GradWatchCallback: fp16=True scales the gradients backward leaves (GradScaler) and is not supported; "
                "use bf16=True, or fp32"
            )
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if not isinstance(model, nn.Module) or optimizer is None:
            raise ValueError(
                f"GradWatchCallback: on_train_begin got model={type(model).__name__}, "
                f"optimizer={type(optimizer).__name__}; it needs both (is this a Trainer?)"
            )
        self._finish()
        inner = _inner_optimizer(optimizer)
        self._accelerated = optimizer if optimizer is not inner else None
        self._gradient_state = getattr(optimizer, "gradient_state", None)
        # attach=False: the callback runs the check itself, at the end of the last micro-batch's backward
        self.watch = GradWatch(model, inner, policy=self.policy, history=self.history, attach=False, **self.options)
        self.watch.add_sink(self._on_record)
        # The skip fallback sets gradients aside for the step and puts them back afterwards.
        self._handles.append(inner.register_step_post_hook(self.watch.step_control.post_step_hook))
        self._handles.append(model.register_forward_hook(self._on_forward, with_kwargs=True))
        for p in model.parameters():
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._global_step = state.global_step
        if state.global_step > 0:
            self._restore(args, state.global_step)

    def _restore(self, args: Any, step: int) -> None:
        candidates = [Path(args.output_dir) / f"checkpoint-{step}" / STATE_FILE]
        resume = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resume, (str, os.PathLike)):
            candidates.insert(0, Path(resume) / STATE_FILE)
        for path in candidates:
            if path.is_file():
                assert self.watch is not None
                self.watch.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
                logger.info("gradwatch: monitor state restored from %s (step %d)", path, self.watch.step)
                return
        logger.warning(
            "gradwatch: training resumes at step %d but no %s was found in %s; detection starts a new warm-up",
            step,
            STATE_FILE,
            ", ".join(str(p.parent) for p in candidates),
        )
        self.watch.step = step  # type: ignore[union-attr]  # step numbers stay the Trainer's

    # ----------------------------------------------------------------------------- measure

    def _on_forward(self, module: nn.Module, inputs: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = _loss_of(output)
        if loss is not None:
            self._losses.append(loss)
            # Given the step's item count, the model normalizes each micro-batch's loss by it (a share
            # of the step's loss); otherwise each is that micro-batch's mean loss.
            self._loss_is_share = kwargs.get("num_items_in_batch") is not None

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._requeue)

    def _requeue(self) -> None:
        # Runs after everything queued during backward (DDP's and FSDP2's reductions among them).
        torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        self._queued = False
        sync = getattr(self._gradient_state, "sync_gradients", True)
        if sync and self._checked_step != self._global_step:
            self._check()

    def _check(self) -> None:
        watch = self.watch
        if watch is None or not self._handles:
            return
        self._checked_step = self._global_step
        # One observation per micro-batch (the monitor records their mean): a share times the number
        # of micro-batches is that micro-batch's loss on the step's scale, and the mean is the step loss.
        losses, self._losses = self._losses, []
        for loss in losses:
            watch.observe_loss(loss * len(losses) if self._loss_is_share else loss)
        watch.check()
        if watch.step_control.skip_path(watch.policy.can_skip) == "host":
            # A host-path skip sets the gradients aside now; put them back until the optimizer step,
            # so the Trainer's clip_grad_norm_ (and its logged grad_norm) sees them (NaN included).
            watch.step_control.restore()
            self._host_skip = True

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Note the step now starting (a check runs once per optimizer step)."""
        self._global_step = state.global_step

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Fallback when no backward pass ran the check (a custom training step): check here, after clipping."""
        if self.watch is not None and self._checked_step != state.global_step:
            if not self._warned_late:
                logger.warning(
                    "gradwatch: no backward pass of step %d reached the monitor; checking before the optimizer step, "
                    "after any gradient clipping",
                    state.global_step,
                )
                self._warned_late = True
            self._check()
        if self.watch is not None and self._host_skip and state.global_step in self._skipped_steps:
            self.watch.step_control.skip_on_host(torch.ones((), dtype=torch.bool))  # undone by its post-step hook
        self._host_skip = False

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Tell accelerate about a skipped step, so the ``Trainer`` leaves the LR scheduler alone."""
        watch = self.watch
        if watch is None or self._accelerated is None or not watch.policy.can_skip:
            return
        step = state.global_step
        if step not in self._skipped_steps:
            watch.flush()  # fused optimizers skipped on the device: one sync to learn it
        if step in self._skipped_steps and hasattr(self._accelerated, "_is_overflow"):
            self._marked_skip = (self._accelerated._is_overflow,)
            self._accelerated._is_overflow = True  # read by accelerator.optimizer_step_was_skipped
        self._skipped_steps.discard(step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Undo the skip mark once the ``Trainer`` has read it."""
        if self._marked_skip is not None and self._accelerated is not None:
            self._accelerated._is_overflow = self._marked_skip[0]
            self._marked_skip = None

    # ----------------------------------------------------------------------------- records and logs

    def _on_record(self, record: StepRecord) -> None:
        self.records += 1
        self._latest = record
        self.events.extend(record.events)
        self._since_log["anomalies"] += len(record.events)
        if record.skipped:
            self._since_log["skipped"] += 1
            self._skipped_steps.add(record.step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        """Add gradwatch's latest drained statistics to the ``Trainer``'s logs (no device sync)."""
        record = self._latest
        if logs is None or record is None or "loss" not in logs:
            return  # only training logs; evaluation logs carry no gradient statistics
        p = self.prefix
        metrics: dict[str, float] = {
            f"{p}/step": float(record.step),
            f"{p}/total_norm": record.total_norm,
            f"{p}/clip_factor": record.clip_factor,
            f"{p}/anomalies": float(self._since_log["anomalies"]),
            f"{p}/skipped": float(self._since_log["skipped"]),
        }
        if record.loss is not None:
            metrics[f"{p}/loss"] = record.loss
        if self.log_layers and record.norms:
            metrics.update({f"{p}/norm/{k}": v for k, v in self._layer_norms(record.names, record.norms).items()})
        self._since_log = {"anomalies": 0, "skipped": 0}
        logs.update(metrics)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(metrics)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the monitor's state into the checkpoint the ``Trainer`` just saved."""
        if self.watch is None or not getattr(state, "is_world_process_zero", True):
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            logger.warning("gradwatch: checkpoint folder %s not found; monitor state not saved", folder)
            return
        torch.save(self.watch.state_dict(), folder / STATE_FILE)

    # ----------------------------------------------------------------------------- detach

    def _finish(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._queued = False
        if self.watch is None:
            return
        try:
            self.watch.flush()
        finally:
            self.watch.remove()  # detached; kept for inspection until the next training run

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Drain the last records and detach."""
        self._finish()
