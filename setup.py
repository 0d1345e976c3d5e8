"""Builds effattn._C: the CPU kernels always, CUDA sources when a CUDA toolchain is found.

All C++/CUDA code uses only PyTorch's stable ABI and is compiled for torch 2.10
(TORCH_TARGET_VERSION) and the CPython limited API (abi3), so one
``cp39-abi3`` wheel runs on every torch >= 2.10 and Python >= 3.9.

The build's facts (kernel head dims, default architectures) come from
effattn/build_facts.py, which csrc/cuda/generate_kernels.py writes.

Environment:
  EFFATTN_CPU_ONLY=1       skip the CUDA sources even if nvcc is there
  TORCH_CUDA_ARCH_LIST     architectures for the CUDA sources (default: build_facts'
                           CUDA_DEFAULT_ARCHS, "8.0;8.6;8.9;9.0a", plus compute_90 PTX that lets the
                           driver compile the sm_80 kernels for newer GPUs, e.g. Blackwell)
  EFFATTN_CUDA_HEAD_DIMS   CUDA kernel head dims to compile, e.g. "64;128" (default: all of
                           build_facts' CUDA_HEAD_DIMS); other head dims run on the next larger one
  EFFATTN_UNVERIFIED=1     also compile the code that has not yet run where it is meant to: the
                           Hopper kernels (wgmma + TMA, with 9.0a in the arch list; never run on a
                           GPU), the Turing tiles (with 7.5 in the arch list, e.g. "7.5;8.0;...";
                           never run on a GPU) and the test-only CPU variant avx2_wide. CI sets it,
                           so they keep compiling; the default build (and the wheel) holds only
                           verified code.
  EFFATTN_SANITIZE=1       AddressSanitizer + UndefinedBehaviorSanitizer on the C++ code (with
                           EFFATTN_CPU_ONLY=1; run with libasan preloaded, as .ci/run does)
  DEBUG=1                  -O0 -g
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import runpy

from setuptools import setup
import torch.utils.cpp_extension as cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

# torch compiles py_limited_api extensions with -DPy_LIMITED_API=<its minimum
# CPython>; its docs say to set this to target another one. Ours is 3.9, to
# match the cp39-abi3 tag below (the module uses only PyModule_Create).
cpp_extension.min_supported_cpython = "0x03090000"

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"
UNVERIFIED = os.environ.get("EFFATTN_UNVERIFIED", "0") == "1"
SANITIZE = os.environ.get("EFFATTN_SANITIZE", "0") == "1"
FACTS = runpy.run_path(os.path.join(ROOT, "effattn", "build_facts.py"))  # plain constants, no imports
TORCH_TARGET = "-DTORCH_TARGET_VERSION=0x020a000000000000"  # stable ABI of torch 2.10


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def extension():
    cxx = ["-O0", "-g"] if DEBUG else ["-O3"]
    # -fno-trapping-math: no code here reads FP exception flags, and it lets the
    # compiler if-convert the clamps of the softmax's exp so those loops vectorise.
    # -ffp-contract=fast: a * b + c on the kernels' vectors becomes one FMA where
    # the ISA variant has it (ISO C++ mode turns contraction off by default).
    cxx += ["-std=c++17", "-fvisibility=hidden", "-fno-trapping-math", "-ffp-contract=fast", TORCH_TARGET,
            "-DEFFATTN_PYTHON_MODULE"]
    cxx += ["-DEFFATTN_CPU_AVX2_WIDE=1"] if UNVERIFIED else []
    # AddressSanitizer + UndefinedBehaviorSanitizer on the C++ code (a CPU-only test build: the
    # process must preload libasan, .ci/run shows how); UBSan's float-divide-by-zero stays off
    # (the kernels' IEEE infinities are meant), and every report aborts.
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize=float-divide-by-zero",
                "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"] if SANITIZE else []
    cxx += sanitize
    sources = rel("csrc/ops.cpp") + rel("csrc/cpu/*.cpp")
    # csrc/cuda/dev/ holds GPU-side diagnostics and host checks, not part of the module.
    cuda_sources = [s for s in rel("csrc/cuda/**/*.cu") + rel("csrc/cuda/**/*.cpp")
                    if not s.startswith(os.path.join("csrc", "cuda", "dev") + os.sep)]
    # One generated file per (direction, dtype, head dim) kernel: keep the selected head dims.
    head_dims = os.environ.get("EFFATTN_CUDA_HEAD_DIMS", "").replace(",", ";").split(";")
    head_dims = [d.strip() for d in head_dims if d.strip()]
    known = [str(d) for d in FACTS["CUDA_HEAD_DIMS"]]
    if any(d not in known for d in head_dims):
        raise ValueError(f"EFFATTN_CUDA_HEAD_DIMS: choose among {';'.join(known)}, got {head_dims}")
    cuda_defines = []
    if head_dims:
        cuda_sources = [s for s in cuda_sources if "instantiations" not in s
                        or any(f"_hdim{d}_" in s for d in head_dims)]
        cuda_defines = ["-DEFFATTN_CUDA_SELECTED_HDIMS"] + [f"-DEFFATTN_CUDA_HDIM_{d}" for d in head_dims]
    use_cuda = bool(cuda_sources) and CUDA_HOME is not None and os.environ.get("EFFATTN_CPU_ONLY", "0") != "1"
    common = dict(name="effattn._C", include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=True)
    if SANITIZE and use_cuda:
        raise SystemExit("setup.py: EFFATTN_SANITIZE=1 instruments the CPU build only; set EFFATTN_CPU_ONLY=1 too")
    if not use_cuda:
        return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, extra_link_args=sanitize, **common)
    nvcc = (["-O0", "-g", "-lineinfo"] if DEBUG else ["-O3", "-lineinfo"]) + [
        "-std=c++17", TORCH_TARGET, "--use_fast_math", "--expt-relaxed-constexpr",
    ] + cuda_defines
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list is None:
        # The default, spelled out: torch adds no arch flags of its own once any -gencode is
        # given. sm_90a code runs on sm_90 only; the PTX of plain compute_90 is what newer
        # GPUs (e.g. Blackwell) JIT-compile (the sm_80-class kernels).
        archs = [a.replace(".", "") for a in FACTS["CUDA_DEFAULT_ARCHS"]]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        ptx = FACTS["CUDA_PTX_ARCH"].replace(".", "")
        nvcc.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
        sm90a, sm75 = "90a" in archs, "75" in archs
    else:
        listed = [a.split("+")[0] for a in arch_list.replace(" ", ";").split(";")]
        sm90a, sm75 = "9.0a" in listed, "7.5" in listed
    # The Hopper kernels (wgmma, TMA: sm_90a code) and the Turing tiles (sm_75: kernels that
    # need sm_80 PTX lowered in csrc/cuda/ptx.h) only when asked for (EFFATTN_UNVERIFIED=1).
    nvcc += ["-DEFFATTN_CUDA_SM90A"] if sm90a and UNVERIFIED else []
    nvcc += ["-DEFFATTN_CUDA_SM75"] if sm75 and UNVERIFIED else []
    return CUDAExtension(
        sources=sources + cuda_sources,
        extra_compile_args={"cxx": cxx + ["-DEFFATTN_WITH_CUDA"], "nvcc": nvcc},
        **common,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
