"""PyTorch Lightning callback: run gradwatch inside ``Trainer.fit`` and log its records to the loggers.

Needs ``lightning`` (or the older ``pytorch_lightning``) installed. The callback checks the
gradients in ``on_before_optimizer_step``, which Lightning calls after the backward pass inside the
optimizer closure, so the check sees this step's gradients even though the optimizer's own step
pre-hooks run before the closure. Metrics reach the loggers from the monitor's asynchronous host
records, never from a per-layer ``.item()``, on the ``Trainer``'s ``log_every_n_steps`` cadence.

Under ``accumulate_grad_batches=N`` Lightning backpropagates each micro-batch's loss divided by
N; the callback hands the monitor each micro-batch's own loss (times N again), so a spike in any
micro-batch is judged, and the step's recorded loss is the mean micro-batch loss (what Lightning
logs as the training loss), not the last micro-batch's share.

Example:
    >>> from gradwatch.integrations.lightning import GradWatchCallback  # doctest: +SKIP
    >>> trainer = lightning.Trainer(callbacks=[GradWatchCallback(policy="skip", history="run.jsonl")])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..events import StepRecord
from ..layers import LayerNorms
from ..monitor import GradWatch

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as error:
        raise ImportError(
            "gradwatch: GradWatchCallback needs PyTorch Lightning; install it with pip install lightning"
        ) from error

__all__ = ["GradWatchCallback"]

logger = logging.getLogger("gradwatch")


class GradWatchCallback(pl.Callback):
    """Watches every gradient of the LightningModule every optimizer step.

    Args:
        policy: gradwatch policy name(s) or objects, as for :class:`gradwatch.GradWatch`.
        history: path of a run history file to write, or None.
        log_layers: also log ``gradwatch/norm/{layer}`` for every layer (module).

    Logged every ``log_every_n_steps`` optimizer steps, where Lightning logs ``self.log`` values:
    ``{prefix}/total_norm``, ``{prefix}/clip_factor``, ``{prefix}/loss`` (the step's mean
    micro-batch loss), and ``{prefix}/anomalies`` / ``{prefix}/skipped`` counted since the previous
    logged point, so nothing between two points goes unseen.
        prefix: metric name prefix.
        **options: more :class:`gradwatch.GradWatch` keyword arguments (``include``, ``exclude``,
            ``every``, ``sinks``, detector options such as ``warmup`` or ``max_norm``).

    Attributes:
        watch: the monitor, from ``on_fit_start`` to the end of fitting (None otherwise).
        events: every anomaly event seen so far (kept after fitting).
    """

    def __init__(
        self,
        *,
        policy: Any = "warn",
        history: Any = None,
        log_layers: bool = False,
        prefix: str = "gradwatch",
        **options: Any,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.history = history
        self.log_layers = log_layers
        self._layer_norms = LayerNorms()
        self.prefix = prefix.rstrip("/")
        self.options = options
        self.watch: GradWatch | None = None
        self.events: list[Any] = []
        self._trainer: Any = None
        self._state: Mapping[str, Any] | None = None
        self._post_hook: Any = None
        self._unlogged = {"anomalies": 0, "skipped": 0}  # since the last logged point

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the monitor on the module and its (first) optimizer."""
        optimizers = list(trainer.optimizers)
        if len(optimizers) > 1:
            logger.warning("gradwatch: GradWatchCallback watches the first of %d optimizers", len(optimizers))
        optimizer = optimizers[0] if optimizers else None
        self._trainer = trainer
        self._unlogged = {"anomalies": 0, "skipped": 0}
        # attach=False: the callback runs the check itself, from on_before_optimizer_step
        self.watch = GradWatch(
            pl_module, optimizer, policy=self.policy, history=self.history, attach=False, **self.options
        )
        self.watch.add_sink(self._log)
        if optimizer is not None:
            # The skip fallback hides gradients during the step and puts them back afterwards.
            self._post_hook = optimizer.register_step_post_hook(self.watch.step_control.post_step_hook)
        if self._state is not None:
            self.watch.load_state_dict(self._state)
            self._state = None

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        """Feed this micro-batch's loss to the loss detector (device ops only)."""
        if self.watch is not None and isinstance(loss, torch.Tensor) and loss.numel() == 1:
            # automatic optimization backpropagates loss / accumulate_grad_batches: undo the division
            n = (
                getattr(trainer, "accumulate_grad_batches", 1)
                if getattr(pl_module, "automatic_optimization", True)
                else 1
            )
            self.watch.observe_loss(loss.detach().reshape(()).double() * n)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Check this step's (accumulated) gradients, with the step's micro-batch losses observed."""
        if self.watch is not None:
            self.watch.check()

    def _log(self, record: StepRecord) -> None:
        self.events.extend(record.events)
        self._unlogged["anomalies"] += len(record.events)
        self._unlogged["skipped"] += int(record.skipped)
        # Lightning logs optimizer step k (0-based) when (k + 1) % log_every_n_steps == 0 (0: never);
        # the steps in between count into the next logged point's anomalies and skipped.
        every = getattr(self._trainer, "log_every_n_steps", 1)
        if not every or (record.step + 1) % every:
            return
        p = self.prefix
        metrics: dict[str, float] = {
            f"{p}/total_norm": record.total_norm,
            f"{p}/clip_factor": record.clip_factor,
            f"{p}/skipped": float(self._unlogged["skipped"]),
            f"{p}/anomalies": float(self._unlogged["anomalies"]),
        }
        self._unlogged = {"anomalies": 0, "skipped": 0}
        if record.loss is not None:
            metrics[f"{p}/loss"] = record.loss
        if self.log_layers:
            layer_norms = self._layer_norms(record.names, record.norms)
            metrics.update({f"{p}/norm/{layer}": norm for layer, norm in layer_norms.items()})
        for pl_logger in getattr(self._trainer, "loggers", []) or []:
            pl_logger.log_metrics(metrics, step=record.step)

    def _finish(self) -> None:
        if self.watch is None:
            return
        try:
            self.watch.flush()
        finally:
            self.watch.remove()
            if self._post_hook is not None:
                self._post_hook.remove()
                self._post_hook = None
            self.watch = None

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Drain the last records and detach."""
        self._finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Detach (and close the history) when fitting fails."""
        self._finish()

    def state_dict(self) -> dict[str, Any]:
        """Return the monitor's state for Lightning checkpoints (detector statistics, policies)."""
        return {"watch": self.watch.state_dict()} if self.watch is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the monitor's state (applied when the monitor is built, if it is not yet)."""
        state = state_dict.get("watch")
        if state is None:
            return
        if self.watch is not None:
            self.watch.load_state_dict(state)
        else:
            self._state = state
