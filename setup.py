"""Builds gradwatch._C: the CPU kernels always, the CUDA kernels whenever nvcc is found.

Environment switches:
    GRADWATCH_FORCE_CPU=1   build the CPU kernels only, even where CUDA is available.
    GRADWATCH_FORCE_CUDA=1  fail unless the CUDA kernels can be built.
    TORCH_CUDA_ARCH_LIST    CUDA architectures; defaults to the visible GPUs, else DEFAULT_CUDA_ARCHS.
    MAX_JOBS                parallel compile jobs (ninja).
"""

import os
import platform
import sys
import sysconfig
from pathlib import Path

# torch finds CUDA_HOME from `which nvcc`; where nvcc is a wrapper script (e.g. /usr/local/bin/nvcc)
# that guess misses the toolkit's lib directory, so prefer the standard toolkit location.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = Path(__file__).parent.resolve()
CSRC = Path("csrc")
# Cubins for the GPUs users most likely have (T4 sm_75; A100/A10/RTX 30xx-40xx sm_80, which also runs
# on sm_86/sm_89; H100/H200 sm_90; B200 sm_100; RTX 50xx sm_120) and PTX of the newest for later GPUs.
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0;10.0;12.0+PTX"

# The vectorized CPU kernel file is compiled once per capability with ATen's macros and flags, and
# the op picks one at run time by at::get_cpu_capability() (as ATen's DispatchStub does).
CPU_KERNEL = CSRC / "cpu" / "kernels_impl.cpp"
CPU_CAPABILITIES = {"DEFAULT": []}
if platform.machine().lower() in ("x86_64", "amd64"):
    CPU_CAPABILITIES["AVX2"] = ["-mavx2", "-mfma", "-mf16c"]
    CPU_CAPABILITIES["AVX512"] = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _choose_cuda() -> bool:
    force_cpu, force_cuda = _flag("GRADWATCH_FORCE_CPU"), _flag("GRADWATCH_FORCE_CUDA")
    if force_cpu and force_cuda:
        sys.exit("setup.py: GRADWATCH_FORCE_CPU and GRADWATCH_FORCE_CUDA are both set; choose one")
    if force_cpu:
        print("gradwatch setup: GRADWATCH_FORCE_CPU=1, building the CPU kernels only")
        return False
    cuda_ok = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if force_cuda and not cuda_ok:
        sys.exit(
            f"setup.py: GRADWATCH_FORCE_CUDA=1 but CUDA_HOME={cpp_extension.CUDA_HOME!r} and "
            f"torch.version.cuda={torch.version.cuda!r}; install nvcc and a CUDA build of torch"
        )
    if not cuda_ok:
        print("gradwatch setup: no nvcc or CPU-only torch, building the CPU kernels only")
        return False
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPUs")
    print(f"gradwatch setup: building CPU and CUDA kernels (CUDA {torch.version.cuda}, archs: {arch})")
    return True


class BuildExtension(cpp_extension.BuildExtension):
    """Adds one object per CPU capability of the vectorized kernel file to the extension.

    An editable install (``pip install --no-build-isolation -e .``, which ``make`` runs) compiles in
    the same ``build/temp.*`` folder as ``setup.py build_ext --inplace`` instead of a fresh temporary
    one, so ninja reuses the objects either one compiled: the extension is compiled once, not twice.
    """

    def finalize_options(self):
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            self.build_temp = str(ROOT / "build" / f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")

    def build_extension(self, ext):
        for capability, flags in CPU_CAPABILITIES.items():
            macros = [("CPU_CAPABILITY", capability), (f"CPU_CAPABILITY_{capability}", None)]
            defines = [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in macros]
            objects = self.compiler.compile(
                [str(CPU_KERNEL)],
                output_dir=os.path.join(self.build_temp, f"cpu_{capability.lower()}"),
                include_dirs=ext.include_dirs,
                # GCC's own AVX-512 headers trip -W(maybe-)uninitialized (_mm512_undefined_*): noise.
                extra_postargs={
                    "cxx": ext.extra_compile_args["cxx"]
                    + defines
                    + flags
                    + ["-Wno-maybe-uninitialized", "-Wno-uninitialized"],
                    "nvcc": [],
                },
                depends=[str(CSRC / name) for name in ("cpu/kernels.h", "stats.h", "hist.h", "isa.h", "dtype.h")],
            )
            ext.extra_objects.extend(objects)
        super().build_extension(ext)


def make_extension():
    with_cuda = _choose_cuda()
    sources = [
        str(CSRC / "gradwatch.cpp"),
        str(CSRC / "cpu" / "grad_stats_cpu.cpp"),
        str(CSRC / "cpu" / "grad_check_cpu.cpp"),
    ]
    cxx = ["-O3", "-std=c++20", "-Wno-unknown-pragmas"] + [f"-DGRADWATCH_HAVE_{c}" for c in CPU_CAPABILITIES]
    # at::parallel_for is header code around `#pragma omp parallel`: without -fopenmp in this
    # extension it silently runs on one thread. torch's OpenMP builds share the same libgomp.
    link = []
    if "OpenMP" in torch.__config__.parallel_info():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    extra = {"cxx": cxx}
    if with_cuda:
        sources += [str(CSRC / "cuda" / "grad_stats_cuda.cu"), str(CSRC / "cuda" / "grad_check_cuda.cu")]
        # --threads 0: the per-arch device compiles (5 cubins + PTX) run in parallel on the free cores.
        extra["nvcc"] = ["-O3", "-std=c++20", "-lineinfo", "--threads", "0"]
        return cpp_extension.CUDAExtension("gradwatch._C", sources, extra_compile_args=extra, extra_link_args=link)
    return cpp_extension.CppExtension("gradwatch._C", sources, extra_compile_args=extra, extra_link_args=link)


setup(
    packages=find_packages(include=["gradwatch", "gradwatch.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
)
