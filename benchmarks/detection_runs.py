"""Seeded training runs for the detection benchmark: small models, and the recorded gradient statistics.

A run trains one model for ``steps`` steps and records, per step, the packed ``[n + 1, 3]``
statistics of :func:`gradwatch.grad_stats_packed` (norm, max |g|, non-finite count per parameter,
the totals in the last row) and the loss. Faults that change the gradients only at the faulty step
(a whole-model or one-parameter scale, NaN, Inf, vanishing) are applied to these recorded
statistics later, exactly: multiplying a gradient by ``k`` multiplies its norm and max |g| by
``k``, and the fault is undone after the check (as a skip would), so training is unchanged. Faults
that change what the gradients *are* are recorded here, beside the clean step:

* ``corrupt_batch`` at step ``t``: the statistics and loss of the same step on a corrupted batch
  (image inputs x100; token labels replaced at random), measured on a copy of the model's buffers;
* ``lr_spike`` at step ``t``: the update of step ``t`` is taken with the learning rate x100, then
  steps ``t + 1 .. t + 3`` are recorded (their statistics and losses show the damage), and the
  model and optimizer are restored to continue the clean run.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import gradwatch

__all__ = ["MODELS", "Recording", "record", "param_kinds", "LR_SPIKE_STEPS"]

LR_SPIKE_STEPS = 3  # steps after a learning-rate spike that are recorded (and may flag it)


class MLP(nn.Module):
    """Three linear layers and a LayerNorm, on 32 features, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv layers (BatchNorm after the first) and a linear head on 3x16x16 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


class TinyLM(nn.Module):
    """A two-layer causal transformer language model (d=32, 2 heads) over 64 tokens."""

    def __init__(self, vocab: int = 64, d: int = 32, seq: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 2, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = self.blocks(x, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.out(self.norm(x)).flatten(0, 1)


def _resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmark model, its data and its optimizer."""

    name: str
    build: object  # () -> nn.Module
    data: str  # "features" | "images16" | "fakedata16" | "tokens"
    optimizer: str  # "adamw" | "sgd"
    lr: float
    warmup_lr: int = 0  # linear learning-rate warm-up steps (0: constant)


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", MLP, "features", "adamw", 1e-3),
    "cnn": ModelSpec("cnn", SmallCNN, "images16", "adamw", 1e-3),
    "resnet18": ModelSpec("resnet18", _resnet18, "fakedata16", "sgd", 0.02),
    "lm": ModelSpec("lm", TinyLM, "tokens", "adamw", 3e-3, warmup_lr=100),
}


class _Data:
    """Deterministic batches by step index (so a replayed step sees the same batch)."""

    def __init__(self, kind: str, seed: int, batch: int = 16) -> None:
        self.kind, self.seed, self.batch = kind, seed, batch
        g = torch.Generator().manual_seed(seed + 1000)
        if kind == "features":
            self.teacher = torch.randn(32, 10, generator=g)
        elif kind == "images16":
            self.templates = torch.randn(10, 3, 16, 16, generator=g)
        elif kind == "fakedata16":
            import torchvision
            from torchvision.transforms import functional as tf

            ds = torchvision.datasets.FakeData(size=256, image_size=(3, 16, 16), num_classes=10, random_offset=seed)
            items = [ds[i] for i in range(len(ds))]
            self.images = torch.stack([tf.to_tensor(img) for img, _ in items])
            self.labels = torch.tensor([int(y) for _, y in items])
        elif kind == "tokens":
            logits = torch.randn(64, 64, generator=g) * 3  # a random Markov chain: learnable structure
            self.transition = logits.softmax(-1)
        else:
            raise ValueError(kind)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        b = self.batch
        if self.kind == "features":
            x = torch.randn(b, 32, generator=g)
            y = (x @ self.teacher + 0.5 * torch.randn(b, 10, generator=g)).argmax(1)
            return x, y
        if self.kind == "images16":
            y = torch.randint(0, 10, (b,), generator=g)
            return self.templates[y] * 0.5 + torch.randn(b, 3, 16, 16, generator=g), y
        if self.kind == "fakedata16":
            i = torch.randint(0, len(self.labels), (b // 2,), generator=g)
            return self.images[i], self.labels[i]
        seq = 33
        tokens = torch.empty(b // 2, seq, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, 64, (b // 2,), generator=g)
        for t in range(1, seq):
            tokens[:, t] = torch.multinomial(self.transition[tokens[:, t - 1]], 1, generator=g)[:, 0]
        return tokens[:, :-1], tokens[:, 1:].flatten()

    def corrupt(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        g = torch.Generator().manual_seed(self.seed * 7 + step)
        if self.kind == "tokens":  # labels replaced by random tokens
            return x, torch.randint(0, 64, y.shape, generator=g)
        return x * 100, torch.randint(0, 10, y.shape, generator=g)  # inputs x100 and labels replaced


def param_kinds(model: nn.Module) -> dict[str, list[int]]:
    """Indices (in ``named_parameters`` order) of weights, biases and norm-layer weights."""
    norm_types = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)
    norm_weights = {
        id(m.weight) for m in model.modules() if isinstance(m, norm_types) and getattr(m, "weight", None) is not None
    }
    kinds: dict[str, list[int]] = {"weight": [], "bias": [], "norm": []}
    for i, (name, p) in enumerate(model.named_parameters()):
        if id(p) in norm_weights:
            kinds["norm"].append(i)
        elif name.endswith("bias") and p.dim() == 1:
            kinds["bias"].append(i)
        elif p.dim() >= 2:
            kinds["weight"].append(i)
    return kinds


@dataclass
class Recording:
    """What one run recorded: clean statistics per step, and the alternatives at fault steps."""

    model: str
    seed: int
    names: list[str]
    kinds: dict[str, list[int]]
    stats: torch.Tensor  # float64 [steps, n + 1, 3]
    loss: torch.Tensor  # float64 [steps]
    corrupt: dict[int, tuple[torch.Tensor, float]] = field(default_factory=dict)  # step -> (stats, loss)
    lr_spike: dict[int, list[tuple[torch.Tensor, float]]] = field(default_factory=dict)  # step -> steps t+1..


def _optimizer(spec: ModelSpec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=5e-4)
    return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)


def _lr(spec: ModelSpec, step: int, steps: int) -> float:
    if spec.warmup_lr and step < spec.warmup_lr:
        return spec.lr * (step + 1) / spec.warmup_lr
    if spec.warmup_lr:  # cosine decay to 10% after the warm-up
        t = (step - spec.warmup_lr) / max(1, steps - spec.warmup_lr)
        return spec.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))
    return spec.lr


def _grads_stats(model: nn.Module, loss: torch.Tensor) -> tuple[torch.Tensor, float]:
    model.zero_grad(set_to_none=False)
    loss.backward()
    return gradwatch.grad_stats_packed([p.grad for p in model.parameters()]).clone(), float(loss.detach())


def record(
    model_name: str,
    seed: int,
    steps: int,
    corrupt_steps: tuple[int, ...] = (),
    lr_spike_steps: tuple[int, ...] = (),
    cache: Path | None = None,
) -> Recording:
    """Trains ``model_name`` for ``steps`` steps with ``seed`` and records its statistics.

    Args:
        model_name: a key of :data:`MODELS`.
        seed: seeds the initialization and the data.
        steps: training steps.
        corrupt_steps: steps at which a corrupted batch's statistics are also recorded.
        lr_spike_steps: steps at which a x100 learning-rate update is forked and followed.
        cache: a directory: the recording is loaded from / saved to a file named by its arguments.
    """
    path = None
    if cache is not None:
        key = f"{model_name}_s{seed}_n{steps}_c{hash(corrupt_steps) & 0xFFFFFF:x}_l{hash(lr_spike_steps) & 0xFFFFFF:x}"
        path = Path(cache) / f"{key}.pt"
        if path.exists():
            return Recording(**torch.load(path, weights_only=False))
    spec = MODELS[model_name]
    torch.manual_seed(seed)
    model = spec.build()
    model.train()
    data = _Data(spec.data, seed)
    optimizer = _optimizer(spec, model)
    criterion = nn.CrossEntropyLoss()
    n = sum(1 for _ in model.parameters())
    stats = torch.empty(steps, n + 1, 3, dtype=torch.float64)
    losses = torch.empty(steps, dtype=torch.float64)
    rec = Recording(model_name, seed, [k for k, _ in model.named_parameters()], param_kinds(model), stats, losses)

    def one_step(step: int, lr_scale: float = 1.0) -> tuple[torch.Tensor, float]:
        x, y = data(step)
        packed, loss = _grads_stats(model, criterion(model(x), y))
        for group in optimizer.param_groups:
            group["lr"] = _lr(spec, step, steps) * lr_scale
        optimizer.step()
        return packed, loss

    for step in range(steps):
        if step in corrupt_steps:
            buffers = {k: v.clone() for k, v in model.named_buffers()}
            x, y = data.corrupt(data(step), step)
            rec.corrupt[step] = _grads_stats(model, criterion(model(x), y))
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(buffers[k])
        if step in lr_spike_steps:
            saved = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
            one_step(step, lr_scale=100.0)
            rec.lr_spike[step] = [one_step(step + k) for k in range(1, LR_SPIKE_STEPS + 1)]
            model.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
        stats[step], losses[step] = one_step(step)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(rec.__dict__, path)
    return rec
