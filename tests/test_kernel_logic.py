"""The CUDA kernels' logic on the CPU: tests/cpp/kernel_logic_test.cpp built with the C++ compiler.

CI has no GPU. The launch plan, the per-thread element walk (alignment split, vectors), the strided
layouts of ``scale_`` and the accumulate/combine/scaled-pass math live in ``csrc/plan.h`` and
``csrc/stats.h``, which the device code uses as is; this builds them with plain g++ (a few seconds)
and runs the checks. Also checks that the shared header cannot leak AVX-512 code into the default
CPU path (its functions are mangled per CPU capability).
"""

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CXX = shutil.which("c++") or shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")


def _compile(tmp_dir: Path, source: Path, flags: list[str], output: str) -> Path:
    inputs = [source, CSRC / "plan.h", CSRC / "stats.h", CSRC / "dtype.h"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in inputs) + " ".join(flags).encode()).hexdigest()[:16]
    target = tmp_dir / f"{output}-{digest}"
    if not target.exists():
        cmd = [CXX, "-std=c++20", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}", f"-I{include_paths()[0]}", *flags]
        done = subprocess.run([*cmd, str(source), "-o", str(target)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
    return target


def test_plan_walk_layouts_and_math(tmp_path_factory):
    binary = _compile(tmp_path_factory.getbasetemp(), ROOT / "tests" / "cpp" / "kernel_logic_test.cpp", ["-O2"], "klt")
    done = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert done.stdout.strip().startswith("ok:"), done.stdout


def test_shared_header_is_mangled_per_cpu_capability(tmp_path_factory, tmp_path):
    # kernels_impl.cpp is compiled with -mavx512f and includes stats.h. Were its inline functions
    # plain `gradwatch::combine`, the linker would keep one copy for every object, possibly the
    # AVX-512 one, and the default path would run it on a CPU without AVX-512.
    source = tmp_path / "tu.cpp"
    source.write_text(
        '#include "stats.h"\n'
        "double use(gradwatch::Partial a, gradwatch::Partial b) { return gradwatch::combine(a, b).sumsq; }\n"
    )
    symbols = {}
    for capability in ("AVX512", None):
        flags = ["-O0", "-c"] + ([f"-DCPU_CAPABILITY={capability}", "-mavx512f"] if capability else [])
        obj = _compile(tmp_path_factory.getbasetemp(), source, flags, f"tu-{capability}.o")
        names = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
        symbols[capability] = {line.split(" ", 2)[2] for line in names.splitlines() if "combine(" in line}
    assert symbols["AVX512"] and all("gradwatch::AVX512::combine" in s for s in symbols["AVX512"])
    assert symbols[None] and all("gradwatch::portable::combine" in s for s in symbols[None])
