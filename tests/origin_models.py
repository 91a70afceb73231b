"""Small models with a switchable fault at a chosen layer, shared by the origin, forward-check and ratio tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Fault:
    """Where and when a fault fires: ``armed`` is read at each call."""

    def __init__(self) -> None:
        self.armed = False


class _NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fault, kind):  # type: ignore[override]
        ctx.fault, ctx.kind = fault, kind
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        if not ctx.fault.armed:
            return g, None, None
        if ctx.kind == "nan":
            return torch.full_like(g, float("nan")), None, None
        return g * 1e4, None, None  # "spike"


class Tap(nn.Module):
    """Identity in forward; in backward, NaN (or x1e4) when its fault is armed and ``kind`` says so."""

    def __init__(self, fault: Fault, kind: str = "nan") -> None:
        super().__init__()
        self.fault, self.kind = fault, kind
        self.backward_fault = False  # this tap is the chosen one
        self.forward_fault = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.forward_fault and self.fault.armed:
            x = torch.log(-x.abs() - 1)  # log of a negative: NaN born in forward, in this module
        if self.backward_fault:
            return _NaNBackward.apply(x, self.fault, self.kind)
        return x


class Block(nn.Module):
    """A residual block: conv-bn-relu-conv-bn (+ shortcut), a tap after each conv."""

    def __init__(self, cin: int, cout: int, fault: Fault) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.tap1 = Tap(fault)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.tap2 = Tap(fault)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.tap1(self.conv1(x))))
        y = self.bn2(self.tap2(self.conv2(y)))
        return F.relu(y + self.short(x))


class ResNetLike(nn.Module):
    def __init__(self, fault: Fault) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_tap = Tap(fault)
        self.block1 = Block(8, 8, fault)
        self.block2 = Block(8, 16, fault)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(F.relu(self.stem_tap(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, fault: Fault, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(12 if i == 0 else width, width) for i in range(depth)])
        self.taps = nn.ModuleList([Tap(fault) for _ in range(depth)])
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)[:, :12]
        for fc, tap in zip(self.fc, self.taps, strict=True):
            x = torch.tanh(tap(fc(x)))
        return self.out(x)


class TransformerBlockModel(nn.Module):
    def __init__(self, fault: Fault, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.embed_tap = Tap(fault)
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.qkv_tap = Tap(fault)
        self.proj = nn.Linear(d, d)
        self.proj_tap = Tap(fault)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc1_tap = Tap(fault)
        self.fc2 = nn.Linear(4 * d, d)
        self.fc2_tap = Tap(fault)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_tap(self.embed(x.flatten(2).transpose(1, 2)))  # [b, tokens, d]
        q, k, v = self.qkv_tap(self.qkv(self.norm1(h))).chunk(3, dim=-1)
        h = h + self.proj_tap(self.proj(F.scaled_dot_product_attention(q, k, v)))
        h = h + self.fc2_tap(self.fc2(F.gelu(self.fc1_tap(self.fc1(self.norm2(h))))))
        return self.head(h.mean(dim=1))


MODELS = {"resnet": ResNetLike, "mlp": MLP, "transformer": TransformerBlockModel}

# per model: taps to fault, each with the module whose parameters it follows
TAPS = {
    "resnet": [("stem_tap", "stem"), ("block1.tap2", "block1.conv2"), ("block2.tap1", "block2.conv1")],
    "mlp": [("taps.0", "fc.0"), ("taps.2", "fc.2"), ("taps.3", "fc.3")],
    "transformer": [("qkv_tap", "qkv"), ("proj_tap", "proj"), ("fc1_tap", "fc1")],
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, Fault]:
    torch.manual_seed(seed)
    fault = Fault()
    return MODELS[name](fault), fault


def batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 10, (n,), generator=g)


def backward_order_oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[str]:
    """Parameter names in the order autograd finishes their gradients: plain post-accumulate hooks."""
    seen: list[str] = []
    handles = [
        p.register_post_accumulate_grad_hook(lambda _p, n=n: seen.append(n)) for n, p in model.named_parameters()
    ]
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return seen
