"""Build of fastacd's one compiled extension, ``fastacd._C``.

C++ CPU sources (csrc/) always; CUDA sources (kernels/*.cu) when nvcc and a CUDA build
of torch are present. Switches (environment variables):

  FASTACD_FORCE_CUDA=1       build the CUDA kernels even where the checks say no
                             (nvcc must exist; CI compiles them on a GPU-less machine)
  FASTACD_FORCE_ONLY_CPU=1   never build the CUDA kernels (wins over FORCE_CUDA)
  TORCH_CUDA_ARCH_LIST       GPU architectures; defaults to "8.0;9.0+PTX" here (compile time)
  MAX_JOBS                   parallel compile jobs (ninja)

A CUDA compile error fails the build. The resolved flags are printed.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _guess_cuda_home():
    """torch guesses CUDA_HOME as the parent of nvcc's folder; a wrapper script such as
    /usr/local/bin/nvcc would give /usr/local (no CUDA headers there). Prefer a real toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for home in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


_guess_cuda_home()  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402
# Machine code for A100 (8.x) and H100/H200 (9.0), and 9.0's PTX, which the driver compiles
# at load time for newer GPUs (Blackwell). Older ones (T4, V100) get the pure-torch formulas:
# fastacd.ops checks a GPU's capability against these targets. Every arch adds compile time.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def nvcc_path():
    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def resolve_cuda():
    """(build CUDA?, why)."""
    if env_flag("FASTACD_FORCE_ONLY_CPU"):
        return False, "FASTACD_FORCE_ONLY_CPU=1"
    nvcc = nvcc_path()
    if env_flag("FASTACD_FORCE_CUDA"):
        if nvcc is None:
            raise RuntimeError("FASTACD_FORCE_CUDA=1 but no nvcc was found: set CUDA_HOME to a CUDA toolkit "
                               "(e.g. /usr/local/cuda) or unset FASTACD_FORCE_CUDA.")
        return True, f"FASTACD_FORCE_CUDA=1, nvcc at {nvcc}"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if nvcc is None:
        return False, "no nvcc found (set CUDA_HOME to build the CUDA kernels)"
    return True, f"nvcc at {nvcc}, torch built with CUDA {torch.version.cuda}"


def arch_tag(archs: str) -> str:
    """The targets nvcc gets, as one macro-safe word: "8.0;9.0+PTX" -> "sm80_compute90_sm90"
    (machine code, PTX). fastacd.ops reads it (``_C.cuda_archs``) to check a GPU at run time."""
    try:  # torch's own translation of TORCH_CUDA_ARCH_LIST into -gencode flags
        from torch.utils.cpp_extension import _get_cuda_arch_flags
        flags = " ".join(_get_cuda_arch_flags())
        targets = re.findall(r"code=(sm|compute)_(\d+[a-z]?)", flags)
    except Exception:  # noqa: BLE001 - a private function: read the list ourselves
        targets = []
        for a in re.split(r"[;, ]+", archs.strip()):
            m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", a)
            if m:
                num = m[1] + m[2] + m[3]
                targets += [("sm", num)] + ([("compute", num)] if m[4] else [])
    return "_".join(kind + num for kind, num in targets) or "none"


def extensions():
    with_cuda, why = resolve_cuda()
    sources = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT) + glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    # -fno-trapping-math: we never enable floating-point traps; it lets gcc turn the
    # formulas' selects into vector blends, so the CPU loops vectorise. Results unchanged.
    # -g0 undoes the interpreter's -g: a 20x smaller library, a faster build.
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-g0"]
    nvcc = ["-O3"]
    define_macros = []
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += sorted(glob.glob("kernels/*.cu", root_dir=ROOT))
        # Letters, digits and "_" only, so the macro needs no shell quoting; ops.cpp stringifies it.
        define_macros += [("FASTACD_WITH_CUDA", "1"), ("FASTACD_CUDA_ARCHS", arch_tag(archs))]
    ext_cls = CUDAExtension if with_cuda else CppExtension
    kwargs = dict(
        name="fastacd._C",
        sources=sources,
        include_dirs=[ROOT],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        # An explicit -lstdc++ binds the shared libstdc++ that torch uses, also where the compiler
        # links a private copy (as the H200 image's /opt/gcc appears to): that copy had no locale,
        # and formatting a number into an error message crashed there (docs/gpu_check.md).
        extra_link_args=["-fopenmp"] + (["-lstdc++"] if sys.platform.startswith("linux") else []),
    )
    print("fastacd build:")
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={CUDA_HOME}")
    print(f"  CUDA kernels: {'yes' if with_cuda else 'no'} ({why})")
    if with_cuda:
        print(f"  TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (targets {arch_tag(archs)})  "
              f"nvcc flags: {' '.join(nvcc)}")
    print(f"  sources: {' '.join(sources)}")
    print(f"  cxx flags: {' '.join(cxx)}  link: {' '.join(kwargs['extra_link_args'])}  "
          f"MAX_JOBS={os.environ.get('MAX_JOBS', '(all cores)')}")
    return [ext_cls(**kwargs)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
