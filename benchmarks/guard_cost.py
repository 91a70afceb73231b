"""``python -m benchmarks.guard_cost``: what one step's check costs, sampled, guarded or neither.

Sampled (full pipeline), guarded (``every=N, guard=True``) and unguarded unsampled steps.

Fixed gradients (a 12-layer MLP, 1024 wide, ~12.6M params), fused AdamW, policy skip; the check the
optimizer pre-hook runs, timed directly, round-robin over the three kinds, median of many calls.
"""

import statistics
import time

import torch

import gradwatch

torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(12)])
for p in model.parameters():
    p.grad = torch.randn_like(p)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
watch = gradwatch.GradWatch(model, opt, policy="skip", every=10, guard=True, attach=False)
plain = gradwatch.GradWatch(model, opt, policy="skip", every=10, guard=False, attach=False)


def timed(w, step):
    w.step = step
    t = time.perf_counter()
    w.check()
    w.step_control.restore()
    return time.perf_counter() - t


for s in range(20):  # warm up both paths
    timed(watch, 10 * s), timed(watch, 10 * s + 3), timed(plain, 10 * s + 3)
full, guard, none = [], [], []
for r in range(60):
    full.append(timed(watch, 10 * (r + 20)))
    guard.append(timed(watch, 10 * (r + 20) + 3))
    none.append(timed(plain, 10 * (r + 20) + 3))
watch.flush()
f, g, n = (statistics.median(x) * 1e3 for x in (full, guard, none))
print(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, threads {torch.get_num_threads()}")
print(f"sampled check (full): {f:.3f} ms; guarded step: {g:.3f} ms; unguarded unsampled step: {n:.4f} ms")
print(f"guard / full check = {g / f:.2f}")
avg_none, avg_guard = (f + 9 * n) / 10, (f + 9 * g) / 10
print(f"per-step average with every=10: no guard {avg_none:.3f} ms, guard {avg_guard:.3f} ms, every=1 {f:.3f} ms")
