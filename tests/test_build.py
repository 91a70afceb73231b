"""The build contains what setup.py promises: CPU kernels always, CUDA kernels wherever nvcc is found."""

import os

import pytest
import torch
from torch.utils import cpp_extension

import gradwatch


def test_cpu_kernels_loaded():
    assert gradwatch.native_backends()["cpu"] is True
    assert gradwatch.cpu_kernel_capability() in ("DEFAULT", "AVX2", "AVX512")


@pytest.mark.skipif(os.environ.get("GRADWATCH_FORCE_CPU") == "1", reason="CPU-only build requested")
def test_cuda_kernels_compiled_wherever_nvcc_is_found():
    # CI has nvcc but no GPU: the CUDA kernels must still have been compiled and registered.
    if cpp_extension.CUDA_HOME is None or torch.version.cuda is None:
        pytest.skip("no nvcc or a CPU-only torch: setup.py builds CPU kernels only")
    assert gradwatch.native_backends()["cuda"] is True
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gradwatch::scale_", "CUDA")
