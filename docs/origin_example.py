"""``python docs/origin_example.py [OUT_DIR]``: the README's picture for issue 16.1/16.3.

A small residual CNN trained 120 steps with AdamW, ``update_ratio_every=2``: one block's second
convolution sits in a param group with ``lr=0`` (frozen by accident), and on step 80 a custom
autograd function after ``block2.conv1`` returns NaN from its backward. Writes ``run.jsonl``, the
report text and ``origin_report.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from origin_models import batch, make  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.report import plot_report  # noqa: E402
from gradwatch.summary import format_summary, summarize  # noqa: E402


def main(out: Path) -> None:
    """Trains the example, writes the history, the report text and the picture into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model, fault = make("resnet")
    model.block2.tap1.backward_fault = True
    frozen = {id(p) for p in model.block1.conv2.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in frozen]},
        {"params": [p for p in model.parameters() if id(p) in frozen], "lr": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)
    history = out / "run.jsonl"
    watch = gradwatch.GradWatch(model, opt, policy="skip", history=history, update_ratio_every=2, warmup=20)
    for step in range(120):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        fault.armed = step == 80
        loss.backward()
        fault.armed = False
        watch.observe_loss(loss)
        opt.step()
        opt.zero_grad()
    watch.remove()
    text = format_summary(summarize(history))
    (out / "report.txt").write_text(text + "\n")
    print(text)
    plot_report(history, out / "origin_report.png", title="gradwatch: NaN origin and update/weight ratios")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs"))
