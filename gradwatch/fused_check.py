"""The whole check in one compiled op: detection and the built-in policies' decision, per device.

``torch.ops.gradwatch.grad_check(packed, fstate, istate, config, index, ignore, loss, loss_flags)``
(schema in ``csrc/gradwatch.cpp``, math once in ``csrc/check.h``) takes one step's packed statistics
(``grad_stats``' output), updates the detector's running state in place, flags every kind and
decides what the built-in policies decide, in one call: on the CPU one dispatched op instead of the
~130-170 of :meth:`Detector.detect` + :meth:`PolicySet.decide` + ``encode_record``. It returns

* ``record``: float64, the monitor's record payload (``_records.encode_record``'s layout, so the
  host side decodes it unchanged);
* ``factors``: float64 ``[n]``, what ``scale_`` multiplies each gradient by;
* ``skip``: bool scalar, whether the optimizer step must not happen.

``torch.ops.gradwatch.grad_stats_check(tensors, fstate, istate, config, ...)`` is ``grad_stats`` and
``grad_check`` in one op, returning ``(packed, record, factors, skip)``: on a GPU the statistics' task
walk and then one block that combines the rows, the total and runs the check (two launches; with
``scale_`` a clipped step is three). The monitor uses it whenever the statistics reach the check
unchanged (no GradScaler unscaling, no distributed reduction, no in-backward measuring).

:class:`FusedCheck` is the bridge to the Python objects, which stay the readable oracle
(``tests/test_fused_check.py`` drives both on the same streams): it packs the
:class:`~gradwatch.detect.DetectorConfig` and the policies into the op's ``float[]`` config and
keeps the detector's running statistics in two device tensors that the op updates in place. The
:class:`~gradwatch.detect.Detector`'s tensors (and each :class:`~gradwatch.policies.Raise`'s
counter) become views of them, so ``state_dict`` / ``load_state_dict`` / ``load_baseline`` work as
before: a state loaded into the detector replaces its tensors, and the next call notices (identity
checks, no device read) and adopts it.

State layout (``S = 2 N + 2`` streams, as :class:`~gradwatch.detect.Detector`; ``k`` the rolling window)::

    fstate float64  [mean S | var S | regression 4 | early_max 1 | window k]
    istate int64    [count S | window_count 1 | one counter per Raise policy]

Config layout (``float[]``, read by ``parse_config`` in ``csrc/check.h``): 24 scalars
(:func:`_config`), then 6 words per policy in decision order (type, kinds bit mask, offset of its
extras, Raise slot, a, b). A ``float[]`` rather than a tensor: the host sizes the outputs from it
without reading the device, and the CUDA kernel takes it by value.

Policies the op runs: :class:`~gradwatch.policies.Warn` and :class:`~gradwatch.policies.LRBackoff`
(nothing on the device), ``Zero``, ``Skip``, ``Rollback`` (its device part is a skip), ``Raise``,
``Clip`` and ``AdaptiveClip``, exactly these classes. A set with any other policy (a user-written
subclass) keeps the Python path: :func:`supports`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ._layout import Stat
from ._ops import _C, scale_unchecked
from .detect import KIND_INDEX, KINDS, NUM_KINDS, Detector
from .events import AnomalyKind
from .policies import AdaptiveClip, Clip, ClipExtras, LRBackoff, PolicySet, Raise, Rollback, Skip, Warn, Zero

__all__ = [
    "FusedCheck",
    "FusedResult",
    "FusedStepLoss",
    "supports",
    "native",
    "check_step",
    "loss_config",
    "CONFIG_VERSION",
]

CONFIG_VERSION = 1
_CONFIG_HEAD = 24
_POLICY_WORDS = 6
_HEAD_SIZE = 10  # len(_records.Head)
_DETECT_COLUMNS = 3  # spike threshold, vanishing threshold, z

# csrc/check.h names the flag columns with constants: the Python order must be the same.
_CHECK_KINDS = (
    AnomalyKind.NONFINITE,
    AnomalyKind.NORM_LIMIT,
    AnomalyKind.TOTAL_NORM_LIMIT,
    AnomalyKind.ROLLING_MEAN,
    AnomalyKind.SPIKE,
    AnomalyKind.VANISHING,
    AnomalyKind.LOSS_SPIKE,
    AnomalyKind.LOSS_NONFINITE,
)
assert KINDS == _CHECK_KINDS, "detect.KINDS changed: update csrc/check.h's kind constants and _CHECK_KINDS"

# policy class -> the op's policy type (None: nothing on the device)
_TYPES: dict[type, int | None] = {
    Warn: None,
    LRBackoff: None,
    Zero: 1,
    Skip: 2,
    Rollback: 2,
    Raise: 3,
    Clip: 4,
    AdaptiveClip: 5,
}
_CLIPS = (Clip, AdaptiveClip)
_MAX_POLICIES = 16


def _has_kernel(device_type: str, op: str = "grad_check") -> bool:
    if _C is None or not hasattr(torch.ops.gradwatch, op):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"gradwatch::{op}", key)


_NATIVE = {"cpu": _has_kernel("cpu"), "cuda": _has_kernel("cuda")}
_NATIVE_LOSS = {"cpu": _has_kernel("cpu", "loss_check"), "cuda": _has_kernel("cuda", "loss_check")}
_LOSS_PACKET = 3 + NUM_KINDS  # StepLoss.encode's layout; the op keeps the running total after it
_LOSS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what loss_check reads


def native(device: torch.device | str) -> bool:
    """Whether ``grad_check`` has a compiled kernel for ``device``'s type."""
    return _NATIVE.get(torch.device(device).type, False)


def supports(policy: PolicySet) -> bool:
    """Whether every member of ``policy`` is a built-in policy the op runs (not a subclass)."""
    on_device = [p for p in policy.policies if _TYPES.get(type(p), 0) is not None]
    return all(type(p) in _TYPES for p in policy.policies) and len(on_device) <= _MAX_POLICIES


def _record_size(config: Sequence[float], n: int, columns: int) -> int:
    """Length of the op's record payload (``record_size`` in ``csrc/check.h``)."""
    return _HEAD_SIZE + 2 * NUM_KINDS + int(config[20]) + n * (columns + _DETECT_COLUMNS + NUM_KINDS)


if _C is not None and hasattr(torch.ops.gradwatch, "grad_check"):

    @torch.library.register_fake("gradwatch::grad_check")
    def _grad_check_fake(
        packed: torch.Tensor,
        fstate: torch.Tensor,
        istate: torch.Tensor,
        config: Sequence[float],
        index: torch.Tensor | None = None,
        ignore: torch.Tensor | None = None,
        loss: torch.Tensor | None = None,
        loss_flags: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        torch._check(packed.dim() == 2, lambda: "grad_check: packed must be [n + 1, columns]")
        torch._check(packed.dtype == torch.float64, lambda: "grad_check: packed must be float64")
        n, columns = packed.shape[0] - 1, packed.shape[1]
        size = _record_size(config, n, columns)
        return packed.new_empty(size), packed.new_empty(n), packed.new_empty((), dtype=torch.bool)


if _C is not None and hasattr(torch.ops.gradwatch, "grad_stats_check"):

    @torch.library.register_fake("gradwatch::grad_stats_check")
    def _grad_stats_check_fake(
        tensors: Sequence[torch.Tensor],
        fstate: torch.Tensor,
        istate: torch.Tensor,
        config: Sequence[float],
        index: torch.Tensor | None = None,
        ignore: torch.Tensor | None = None,
        loss: torch.Tensor | None = None,
        loss_flags: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        torch._check(len(tensors) > 0, lambda: "grad_stats_check: tensors is empty; pass at least one tensor")
        n = len(tensors)
        packed = tensors[0].new_empty((n + 1, len(Stat)), dtype=torch.float64)
        f64 = packed.new_empty
        return packed, f64(_record_size(config, n, len(Stat))), f64(n), f64((), dtype=torch.bool)


if _C is not None and hasattr(torch.ops.gradwatch, "loss_check"):

    @torch.library.register_fake("gradwatch::loss_check")
    def _loss_check_fake(
        loss: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
        count: torch.Tensor,
        packet: torch.Tensor,
        flags: torch.Tensor,
        micro_batch: int,
        config: Sequence[float],
    ) -> None:
        torch._check(loss.numel() == 1, lambda: "loss_check: loss must hold one element")
        torch._check(packet.numel() == _LOSS_PACKET + 1, lambda: "loss_check: packet has the wrong size")


def loss_config(detector: Detector) -> list[float]:
    """``loss_check``'s config from ``detector``'s loss rule: sigma, warmup, clamp_after, huber, ema."""
    stats = detector.loss
    return [float(detector.loss_sigma), float(stats.warmup), float(stats.clamp_after), stats.huber, stats.ema]


class FusedStepLoss:
    """:class:`~gradwatch._records.StepLoss` in one op per observed loss (``loss_check``, ``csrc/loss_check.h``).

    The loss is judged (a spike or a non-finite loss, :meth:`Detector.detect_loss`'s rule), the
    detector's loss statistics are updated in place, and the step's packet (mean over its
    micro-batches, the worst spike and its threshold, the flags) is kept on the device, ready to copy:
    one launch per loss instead of ~60 ops. :class:`StepLoss` is the oracle (``tests/test_loss_check.py``).

    Args:
        step: the step the losses belong to.
        detector: whose loss statistics judge and learn the losses.
    """

    def __init__(self, step: int, detector: Detector):
        self.step = step
        self.detector = detector
        self.count = 0
        self._packet: torch.Tensor | None = None
        self._flags: torch.Tensor | None = None

    @staticmethod
    def runs(loss: torch.Tensor, detector: Detector) -> bool:
        """Whether the op can take ``loss``: a compiled kernel for its device, the detector's loss state there."""
        stats = detector.loss
        on_device = stats.mean is None or stats.mean.device == loss.device
        valid = loss.numel() == 1 and loss.dtype in _LOSS_DTYPES
        return _NATIVE_LOSS.get(loss.device.type, False) and on_device and valid

    def observe(self, loss: torch.Tensor) -> None:
        """Judges the next micro-batch's loss and folds it into the step's (one op, no sync)."""
        stats = self.detector.loss
        stats._ensure(loss.device)
        if self._packet is None:
            self._packet = torch.empty(_LOSS_PACKET + 1, dtype=torch.float64, device=loss.device)
            self._flags = torch.empty(NUM_KINDS, dtype=torch.bool, device=loss.device)
        elif loss.device != self._packet.device:
            raise ValueError(
                f"observe_loss: this step's losses were on {self._packet.device}, this one is on {loss.device}; "
                "pass every micro-batch's loss from one device"
            )
        value = loss.detach()
        if value.dtype not in _LOSS_DTYPES:
            # an integer, bool or float8 micro-batch after a float one: Detector.detect_loss's cast
            value = value.to(torch.float64)
        self.count += 1
        torch.ops.gradwatch.loss_check(
            value,
            stats.mean,
            stats.var,
            stats.count,
            self._packet,
            self._flags,
            self.count,
            loss_config(self.detector),
        )

    @property
    def mean(self) -> torch.Tensor:
        """The step's loss: the mean over its micro-batches (float64 scalar, on the device)."""
        return self._packet[0]

    @property
    def flags(self) -> torch.Tensor:
        """Bool ``[NUM_KINDS]``: the loss flags of any of the step's losses."""
        return self._flags

    def encode(self) -> torch.Tensor:
        """:meth:`StepLoss.encode`'s vector: mean, spike value, spike threshold, flags."""
        return self._packet[:_LOSS_PACKET]


def _opt(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _config(detector: Detector, policy: PolicySet) -> tuple[list[float], tuple[int, ...], list[Raise]]:
    """The op's config, the extras sizes per policy (in the set's order) and the Raise policies."""
    c = detector.config
    sizes = tuple(3 if type(p) in _CLIPS else 0 for p in policy.policies)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    raises = [p for p in policy.policies if type(p) is Raise]
    words: list[float] = []
    order = sorted(range(len(policy.policies)), key=lambda i: policy.policies[i].priority)  # PolicySet.decide's
    count = 0
    for i in order:
        p = policy.policies[i]
        kind = _TYPES[type(p)]
        if kind is None:
            continue
        mask = sum(1 << KIND_INDEX[k] for k in p.kinds if k in KIND_INDEX)
        a, b = 0.0, math.nan
        slot = -1
        if isinstance(p, Raise):
            a, slot = float(p.after), raises.index(p)
        elif type(p) is Clip:
            a = p.max_norm
        elif type(p) is AdaptiveClip:
            a, b = p.z, _opt(p.max_norm)
        extras = offsets[i] if sizes[i] else -1
        words += [float(kind), float(mask), float(extras), float(slot), a, b]
        count += 1
    head = [
        float(CONFIG_VERSION),
        float(detector.num_params),
        float(c.warmup),
        float(detector.norms.clamp_after),
        float(c.rolling_window),
        float(c.early_steps),
        c.sigma,
        c.ema,
        _opt(c.max_norm),
        _opt(c.max_total_norm),
        _opt(c.rolling_limit),
        c.total_sigma,
        c.resid_sigma,
        c.huber,
        math.log(c.min_spike_ratio),
        math.log(c.total_spike_ratio),
        math.log(c.vanishing_ratio),
        math.nan if c.early_factor is None else math.log(c.early_factor),
        1.0 if c.per_param else 0.0,
        float(count),
        float(sum(sizes)),
        float(len(raises)),
        0.0,
        0.0,
    ]
    assert len(head) == _CONFIG_HEAD
    return head + words, sizes, raises


class FusedResult(NamedTuple):
    """What one :meth:`FusedCheck.__call__` returns, on the statistics' device.

    Attributes:
        record: float64, the record payload (``_records.encode_record``'s layout).
        factors: float64 ``[n]``, the gradients' scale factors.
        skip: bool scalar, the optimizer step must not happen.
    """

    record: torch.Tensor
    factors: torch.Tensor
    skip: torch.Tensor


class FusedCheck:
    """Runs a :class:`~gradwatch.detect.Detector` and a built-in :class:`~gradwatch.policies.PolicySet` as one op.

    Args:
        detector: the detector whose running statistics the op updates (they become views of the
            op's state at the first call).
        policy: the policies; :func:`supports` must hold.

    Raises:
        ValueError: a policy of ``policy`` is not one the op runs.
    """

    def __init__(self, detector: Detector, policy: PolicySet):
        if not supports(policy):
            others = [type(p).__name__ for p in policy.policies if type(p) not in _TYPES]
            raise ValueError(f"FusedCheck runs the built-in policies only; {others} need the Python path")
        self.detector, self.policy = detector, policy
        self._views: tuple[torch.Tensor, ...] = ()
        self._configure()
        self.fstate: torch.Tensor | None = None
        self.istate: torch.Tensor | None = None
        self._regression: torch.Tensor | None = None

    def _signature(self) -> tuple[Any, ...]:
        """What the config is built from that a user may change after construction (members, order, limits, kinds)."""
        return tuple(
            (p, p.priority, p.kinds, getattr(p, "max_norm", None), getattr(p, "z", None), getattr(p, "after", None))
            for p in self.policy.policies
        )

    def _configure(self) -> None:
        self.config, self.extras_sizes, raises = _config(self.detector, self.policy)
        # what decode_record rebuilds each policy's report from (the Python path's extras_layout)
        self.extras_layout: tuple[type | None, ...] = tuple(ClipExtras if size else None for size in self.extras_sizes)
        if [id(r) for r in raises] != [id(r) for r in getattr(self, "_raises", [])]:
            self._views = ()  # other Raise counters: the integer state is rebuilt
        self._raises = raises
        self._signature_now = self._signature()

    def refresh(self) -> bool:
        """Rebuilds the config if a policy changed since the last call; False if the op can no longer run them.

        Host work only (a tuple of the policies' limits and kinds compared): a user may change
        ``Clip.max_norm`` or a policy's kinds between steps, and the Python path would see it.
        """
        if self._signature() == self._signature_now:
            return True
        if not supports(self.policy):
            return False
        self._configure()
        return True

    def _bound(self) -> bool:
        d, v = self.detector, self._views
        if not v:
            return False
        now = (d.norms.mean, d.norms.var, d.norms.count, d.early_max, d.window, d.window_count)
        if any(a is not b for a, b in zip(now, v, strict=False)):
            return False
        if d.regression is not None and d.regression is not self._regression:
            return False
        return all(r.count is view for r, view in zip(self._raises, v[len(now) :], strict=True))

    def bind(self, device: torch.device) -> None:
        """Builds the op's state from the detector's (and the Raise counters') and makes theirs views of it."""
        d = self.detector
        n_streams, k = 2 * d.num_params + 2, d.config.rolling_window
        f64, i64 = torch.float64, torch.int64

        def part(t: torch.Tensor | None, size: int, fill: float, dtype: torch.dtype) -> torch.Tensor:
            if t is None:
                return torch.full((size,), fill, dtype=dtype, device=device)
            return t.detach().to(device, dtype).reshape(size)

        self.fstate = torch.cat(
            [
                part(d.norms.mean, n_streams, 0.0, f64),
                part(d.norms.var, n_streams, 0.0, f64),
                part(d.regression, 4, 0.0, f64),
                part(d.early_max, 1, -math.inf, f64),
                part(d.window, k, 0.0, f64),
            ]
        )
        self.istate = torch.cat(
            [
                part(d.norms.count, n_streams, 0, i64),
                part(d.window_count, 1, 0, i64),
                *(part(r.count, 1, 0, i64) for r in self._raises),
            ]
        )
        f, i, s = self.fstate, self.istate, n_streams
        d.norms.mean, d.norms.var, d.norms.count = f[:s], f[s : 2 * s], i[:s]
        self._regression = f[2 * s : 2 * s + 4]
        if d.regression is not None:
            d.regression = self._regression
        d.early_max, d.window, d.window_count = f[2 * s + 4 : 2 * s + 5], f[2 * s + 5 :], i[s]
        for j, r in enumerate(self._raises):
            r.count = i[s + 1 + j]
        self._views = (d.norms.mean, d.norms.var, d.norms.count, d.early_max, d.window, d.window_count) + tuple(
            r.count for r in self._raises
        )

    def __call__(
        self,
        packed: torch.Tensor,
        index: torch.Tensor | None = None,
        ignore: torch.Tensor | None = None,
        loss: torch.Tensor | None = None,
        loss_flags: torch.Tensor | None = None,
        *,
        refresh: bool = True,
    ) -> FusedResult:
        """Checks one step: the detector's and the policies' work on ``packed``, in one op.

        Args:
            packed: float64 ``[n + 1, columns]`` statistics (``grad_stats_packed``).
            index: int64 ``[n]``, which watched parameters the rows are (None: all, in order).
            ignore: bool scalar; True: a GradScaler's own skip (nothing flagged or learned).
            loss: float64 scalar, the step's loss (the total norm is also judged given it).
            loss_flags: bool ``[NUM_KINDS]``, the flags of the step's observed losses.
            refresh: follow policies changed since the last call (False: the caller just called
                :meth:`refresh`).
        """
        self._prepare(packed.device, loss, refresh)
        out = torch.ops.gradwatch.grad_check(
            packed, self.fstate, self.istate, self.config, index, ignore, loss, loss_flags
        )
        return FusedResult(*out)

    def with_stats(
        self,
        grads: list[torch.Tensor],
        index: torch.Tensor | None = None,
        ignore: torch.Tensor | None = None,
        loss: torch.Tensor | None = None,
        loss_flags: torch.Tensor | None = None,
        *,
        refresh: bool = True,
    ) -> tuple[torch.Tensor, FusedResult]:
        """The statistics pass and the check of :meth:`__call__` in one op (``grad_stats_check``).

        On a GPU two launches instead of four (the task walk; then the rows, the total and the
        check in one block). For statistics that are changed before the check (a GradScaler's
        unscaling, a distributed reduction) measure first and call the object instead.

        Args:
            grads: the gradients, on one device (validated by the caller).
            index: as :meth:`__call__`.
            ignore: as :meth:`__call__`.
            loss: as :meth:`__call__`.
            loss_flags: as :meth:`__call__`.
            refresh: as :meth:`__call__`.

        Returns:
            ``(packed, result)``: the statistics (``grad_stats``' output) and the check's result.

        Raises:
            ValueError: ``grads`` is empty.
        """
        if not grads:
            raise ValueError("FusedCheck.with_stats: grads is empty; pass at least one gradient")
        self._prepare(grads[0].device, loss, refresh)
        packed, *out = torch.ops.gradwatch.grad_stats_check(
            grads, self.fstate, self.istate, self.config, index, ignore, loss, loss_flags
        )
        return packed, FusedResult(*out)

    def _prepare(self, device: torch.device, loss: torch.Tensor | None, refresh: bool) -> None:
        """Config current, state on ``device`` and bound to the detector's tensors."""
        if refresh and not self.refresh():
            raise ValueError("FusedCheck: the policy set now holds a policy the op does not run")
        if not self._bound() or self.fstate.device != device:
            self.bind(device)
        if loss is not None and self.detector.regression is None:
            self.detector.regression = self._regression  # the Python detector creates it with the first loss


def check_step(
    grads: list[torch.Tensor],
    fstate: torch.Tensor,
    istate: torch.Tensor,
    config: list[float],
    apply: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole check as plain op calls (for ``torch.compile``): statistics, detection, decision, ``scale_``.

    Args:
        grads: the gradients (one device, validated by the caller).
        fstate: a :class:`FusedCheck`'s float64 state (updated in place).
        istate: its int64 state (updated in place).
        config: a :class:`FusedCheck`'s config.
        apply: scale the gradients by the decided factors.

    Returns:
        ``(record, factors, skip)`` as :class:`FusedResult`.
    """
    _, record, factors, skip = torch.ops.gradwatch.grad_stats_check(grads, fstate, istate, config)
    if apply:
        scale_unchecked(grads, factors)
    return record, factors, skip
