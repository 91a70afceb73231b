"""Benchmark workloads: models, seeded synthetic data and optimizers, sized per device and mode.

Every workload is built from a fixed seed so that every method sees the same weights and the
same batches; nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["WORKLOADS", "Workload", "build_workload"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Workload:
    """One model with its data, loss and optimizer, ready to train.

    Attributes:
        name: workload key (``"resnet50"``, ``"gpt2s"``, ``"tiny_params"``).
        description: the shapes used, for the results table.
        model: the model, on ``device``.
        optimizer: its optimizer, fused: the common choice on GPUs, and the one with which a skipped
            step needs no host sync (the skip flag goes into ``optimizer.found_inf``).
        batches: a few fixed, seeded batches cycled through (generating data is not part of the step).
        loss_fn: ``loss_fn(model, batch) -> loss``.
        autocast_dtype: dtype for ``torch.autocast`` on the device, or None for full precision.
    """

    name: str
    description: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[Batch]
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor]
    autocast_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def num_tensors(self) -> int:
        return sum(1 for _ in self.model.parameters())


def _classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    tokens, targets = batch
    logits = model(tokens)
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class GPT(nn.Module):
    """A GPT-2-shaped decoder built from ``torch.nn`` (pre-norm blocks, GELU, tied embeddings).

    GPT-2 small is ``vocab=50257, context=1024, width=768, depth=12, heads=12`` (124M parameters).
    """

    def __init__(self, vocab: int, context: int, width: int, depth: int, heads: int):
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.token.weight  # tied, as in GPT-2
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        h = self.token(tokens) + self.position(torch.arange(n, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


class TinyParams(nn.Module):
    """Thousands of tiny parameters: ``depth`` residual blocks of LayerNorm + Linear (4 tensors each).

    The worst case for anything that does per-parameter work in Python or launches per tensor.
    """

    def __init__(self, width: int, depth: int, classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(depth))
        self.head = nn.Linear(width, classes)
        for block in self.blocks:
            nn.init.normal_(block[1].weight, std=0.5 / math.sqrt(width * depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


# Sizes: CPU "full" keeps a step near a second on a 2-core machine; "quick" is the CI smoke size;
# CUDA uses realistic batches.
_SIZES: dict[str, dict[str, dict[str, int]]] = {
    "resnet50": {
        "quick": {"batch": 2, "image": 32, "classes": 10},
        "cpu": {"batch": 8, "image": 112, "classes": 1000},
        "cuda": {"batch": 64, "image": 224, "classes": 1000},
    },
    "gpt2s": {
        "quick": {"batch": 2, "seq": 16, "context": 16, "vocab": 512, "width": 64, "depth": 2, "heads": 2},
        "cpu": {"batch": 2, "seq": 64, "context": 1024, "vocab": 50257, "width": 768, "depth": 12, "heads": 12},
        "cuda": {"batch": 8, "seq": 1024, "context": 1024, "vocab": 50257, "width": 768, "depth": 12, "heads": 12},
    },
    "tiny_params": {
        "quick": {"batch": 8, "width": 8, "depth": 32},
        "cpu": {"batch": 64, "width": 16, "depth": 1024},
        "cuda": {"batch": 256, "width": 16, "depth": 1024},
    },
}

WORKLOADS: tuple[str, ...] = tuple(_SIZES)

_NUM_BATCHES = 2  # cycled; enough that consecutive steps differ


def _size_key(device: torch.device, quick: bool) -> str:
    if quick:
        return "quick"
    return "cuda" if device.type == "cuda" else "cpu"


def build_workload(name: str, device: torch.device, *, quick: bool = False, seed: int = 0) -> Workload:
    """Builds workload ``name`` on ``device`` with seeded weights and data.

    Args:
        name: one of :data:`WORKLOADS`.
        device: where the model and data live.
        quick: use the CI smoke size (seconds for the whole suite) instead of the benchmark size.
        seed: seeds the weights and the data, so every method sees identical inputs.

    Raises:
        ValueError: ``name`` is not a known workload.
    """
    if name not in _SIZES:
        raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(WORKLOADS)}")
    s = _SIZES[name][_size_key(device, quick)]
    autocast = torch.bfloat16 if device.type == "cuda" else None
    generator = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)

    if name == "resnet50":
        import torchvision  # imported here: only this workload needs it

        model = torchvision.models.resnet50(num_classes=s["classes"]).to(device)
        # channels_last is how ResNets are trained on GPUs (tensor-core convolutions).
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        model = model.to(memory_format=layout)
        batches = [
            (
                torch.randn(s["batch"], 3, s["image"], s["image"], generator=generator).to(
                    device, memory_format=layout
                ),
                torch.randint(0, s["classes"], (s["batch"],), generator=generator).to(device),
            )
            for _ in range(_NUM_BATCHES)
        ]
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
        description = f"ResNet-50, batch {s['batch']} x 3x{s['image']}x{s['image']}, fused SGD momentum"
        loss_fn = _classification_loss
    elif name == "gpt2s":
        model = GPT(s["vocab"], s["context"], s["width"], s["depth"], s["heads"]).to(device)
        batches = []
        for _ in range(_NUM_BATCHES):
            tokens = torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), generator=generator).to(device)
            batches.append((tokens[:, :-1], tokens[:, 1:]))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
        description = (
            f"GPT-2-shaped ({s['depth']}x{s['width']}, {s['heads']} heads, vocab {s['vocab']}), "
            f"batch {s['batch']} x {s['seq']} tokens, fused AdamW"
        )
        loss_fn = _lm_loss
    else:
        model = TinyParams(s["width"], s["depth"]).to(device)
        batches = [
            (
                torch.randn(s["batch"], s["width"], generator=generator).to(device),
                torch.randint(0, 10, (s["batch"],), generator=generator).to(device),
            )
            for _ in range(_NUM_BATCHES)
        ]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
        description = f"{s['depth']} blocks of LayerNorm+Linear({s['width']}), batch {s['batch']}, fused SGD momentum"
        loss_fn = _classification_loss

    workload = Workload(name, description, model, optimizer, batches, loss_fn, autocast)
    workload.description += f"; {workload.num_tensors} tensors, {workload.num_params / 1e6:.2f}M params"
    return workload
