"""Builds bespoke_ext._C: the C++ (always) and CUDA (when available) kernels of the ops.

Switches (environment variables):
  BESPOKE_EXT_FORCE_CPU=1   build the CPU kernels only, even with a CUDA toolkit present
  BESPOKE_EXT_FORCE_CUDA=1  compile the CUDA kernels even when no GPU is visible (the usual
                            case on build machines); fails if torch or the toolkit lacks CUDA
By default CUDA kernels are compiled when torch is a CUDA build and a toolkit is found
(CUDA_HOME). TORCH_CUDA_ARCH_LIST picks the GPU architectures, as for any torch extension;
without it, the visible GPU's, or DEFAULT_CUDA_ARCH_LIST when none is visible.
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _use_cuda() -> bool:
    if _flag("BESPOKE_EXT_FORCE_CPU"):
        return False
    import torch

    has_toolkit = cpp_extension.CUDA_HOME is not None
    if _flag("BESPOKE_EXT_FORCE_CUDA"):
        if torch.version.cuda is None or not has_toolkit:
            raise RuntimeError(
                "BESPOKE_EXT_FORCE_CUDA=1 but "
                + ("torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit was found (set CUDA_HOME)")
            )
        return True
    return torch.version.cuda is not None and has_toolkit


# Used when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset: A100, H100/H200, and PTX
# that newer GPUs compile at load time. (torch would otherwise look for a visible GPU's
# architecture and fail with an IndexError.)
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _default_cuda_arch_list() -> None:
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or torch.cuda.is_available():
        return
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    print(f"bespoke_ext: no GPU visible and TORCH_CUDA_ARCH_LIST unset; building for {DEFAULT_CUDA_ARCH_LIST}")


def _extension():
    # -ffp-contract=off: no fused multiply-add, so every CPU build gives the same bits (csrc/cpu);
    # -fno-math-errno: sqrt sets no errno, so loops of it vectorise
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]  # the C++ standard is the one torch asks for
    link = ["-fopenmp"]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if _use_cuda():
        _default_cuda_arch_list()
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # --fmad=false: no fused multiply-add either, so CUDA sums have the CPU's bits (elementwise ops)
        nvcc = ["-O3", "-lineinfo", "--fmad=false"]
        return cpp_extension.CUDAExtension(
            "bespoke_ext._C",
            sources,
            extra_compile_args={"cxx": cxx + ["-DBESPOKE_EXT_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=link,
        )
    return cpp_extension.CppExtension(
        "bespoke_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
    )


def _write_build_records(cmd) -> None:
    """Record the torch each library was built against, next to it (bespoke_ext/extension.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bespoke_ext_extension", os.path.join(ROOT, "bespoke_ext", "extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for ext in cmd.extensions:
        module.write_build_record(cmd.get_ext_fullpath(ext.name))  # in place (editable) or in build_lib (wheel)


class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    def run(self):
        super().run()
        _write_build_records(self)


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})
