"""Which C++ errors of the extension reach Python as exceptions, each case in its own process.

On the first H200 (2026-11-28: torch 2.11, /opt/gcc/bin/g++) two error paths killed the process with a
segfault instead of raising (`scale_` of overlapping views, `grad_stats_hist` of an int32 tensor), while
they raise here. This probe runs every kind of C++ error in a child process, so one crash cannot hide the
others, and prints one line per case: `raised <type>`, `CRASHED (signal)` or `no error`.

    python -m benchmarks.exception_probe
"""

from __future__ import annotations

import subprocess
import sys

CASES = {
    "int32 tensor (dtype check, streams a ScalarType)": "torch.ops.gradwatch.grad_stats([torch.ones(2).int()])",
    "mixed devices (streams a Device; skips without CUDA)": (
        "assert torch.cuda.is_available(); torch.ops.gradwatch.grad_stats([torch.ones(2).cuda(), torch.ones(2)])"
    ),
    "int32 tensor, histogram op": "torch.ops.gradwatch.grad_stats_hist([torch.ones(2, dtype=torch.int32)])",
    "overlapping view (scale_, streams sizes)": (
        "x = torch.zeros(16); torch.ops.gradwatch.scale_([x, x.as_strided((4, 4), (2, 1))],"
        " torch.ones(2, dtype=torch.float64))"
    ),
    "aliased tensors (scale_, no c10 type streamed)": (
        "x = torch.zeros(16); torch.ops.gradwatch.scale_([x, x], torch.ones(2, dtype=torch.float64))"
    ),
    "bad factors (streams sizes and dtype)": (
        "x = torch.zeros(16); torch.ops.gradwatch.scale_([x], torch.ones(3, dtype=torch.float64))"
    ),
    "plain TORCH_CHECK inside torch (control)": "torch.ones(2) + torch.ones(3)",
}
_PRELUDE = 'import torch, gradwatch\nassert gradwatch.native_backends()["cpu"], "no compiled CPU kernel"\n'


def main() -> int:
    """Runs every case in a child process and prints what happened."""
    crashed = 0
    for name, code in CASES.items():
        child = subprocess.run([sys.executable, "-c", _PRELUDE + code], capture_output=True, text=True, timeout=120)
        if child.returncode < 0:
            outcome, crashed = f"CRASHED (signal {-child.returncode})", crashed + 1
        elif child.returncode == 0:
            outcome = "no error"
        else:
            last = (child.stderr.strip().splitlines() or ["?"])[-1]
            outcome = f"raised {last[:160]}"
        print(f"{name}: {outcome}")
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
