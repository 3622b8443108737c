"""Builds bmkernels._C: CPU kernels for several instruction sets (always) and CUDA kernels (when
a CUDA toolkit and a CUDA build of torch are present).

Environment:
  BMK_FORCE_CUDA=1   a missing CUDA toolkit is an error      BMK_SKIP_CUDA=1   build CPU only
  BMK_CUDA_EMULATOR=1  also build the CUDA kernel sources with g++ into the SIMT emulator (CPU tensors,
                     backend "cuda_emulated"; no toolkit needed)
  TORCH_CUDA_ARCH_LIST  default "8.0;9.0"                   MAX_JOBS          parallel compile jobs
  CUDA_HOME / CUDA_PATH  the toolkit root (else found next to nvcc, checked for libcudart)
  BMK_SANITIZE=address,undefined  CPU kernels only, built with -fsanitize=... (and -O1 -g), objects in
                     build/sanitize; build it in a copy of the tree, as `make test-asan` does
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"

# Per-ISA flags. The same kernel source is compiled once per entry, inside namespace CPU_CAPABILITY,
# and csrc/cpu/registration.cpp picks one at run time. No -march=native: the wheel runs anywhere.
CPU_ISAS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]


def sanitize_flags():
    """-fsanitize flags from BMK_SANITIZE (e.g. "address,undefined"), or [] for the normal build.

    vptr is left out: torch's classes' type info lives in other libraries, so UBSan's dynamic-type
    check reports every virtual call into them. -O1 keeps the reports' line numbers true.
    """
    kinds = os.environ.get("BMK_SANITIZE", "").strip()
    if not kinds:
        return []
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={kinds}"]
    return flags + (["-fno-sanitize=vptr"] if "undefined" in kinds.split(",") else [])


SANITIZE = sanitize_flags()
CXX_FLAGS += SANITIZE


def env_flag(name):
    return os.environ.get(name, "") not in ("", "0", "false", "False")


def max_jobs():
    return str(max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))))


def find_cuda_home():
    """The real toolkit root: CUDA_HOME/CUDA_PATH, the standard location, or nvcc's grandparent.

    torch's own guess takes the parent of the first `nvcc` on PATH, which is wrong when that nvcc
    is a wrapper script; every candidate here must hold both bin/nvcc and lib64/libcudart.so.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
        # a wrapper script that execs the real nvcc names it inside
        try:
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            candidates += [str(Path(w).parent.parent) for w in text.split() if w.endswith("/bin/nvcc")]
        except OSError:
            pass
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "lib64" / "libcudart.so").exists():
            return str(Path(home).resolve())
    return None


def nvidia_pip_include_dirs():
    """cuBLAS/cuSPARSE headers from the pip `nvidia` packages (torch's CUDAContext.h needs them)."""
    site = Path(torch.__file__).resolve().parent.parent / "nvidia"
    return sorted(str(p) for p in site.glob("*/include") if p.is_dir())


def cuda_plan():
    """Returns the CUDA toolkit root to build with, or None for a CPU-only build."""
    force, skip = env_flag("BMK_FORCE_CUDA"), env_flag("BMK_SKIP_CUDA")
    if force and skip:
        sys.exit("setup.py: BMK_FORCE_CUDA and BMK_SKIP_CUDA are both set; pick one")
    if skip:
        return None
    if SANITIZE:
        if force:
            sys.exit("setup.py: BMK_SANITIZE builds the CPU kernels only; it cannot go with BMK_FORCE_CUDA")
        return None
    if torch.version.cuda is None:
        if force:
            sys.exit(f"setup.py: BMK_FORCE_CUDA=1 but torch {torch.__version__} is not a CUDA build")
        return None
    home = find_cuda_home()
    if home is None:
        if force:
            sys.exit(
                "setup.py: BMK_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME to a "
                "directory holding bin/nvcc and lib64/libcudart.so)"
            )
        return None
    return home


def cuda_arch_list():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


# CPU sources compiled once rather than per ISA: the dispatch and the process-wide buffer pool
CPU_ONCE = ("registration.cpp", "scratch.cpp", "conv_engine.cpp")


def isa_kernel_sources():
    return sorted(p for p in (CSRC / "cpu").glob("*.cpp") if p.name not in CPU_ONCE)


def cuda_kernel_sources():
    return sorted((CSRC / "cuda").glob("*.cu"))


def cuda_glue_sources():
    """The torch glue of the CUDA kernels (compiled by the host compiler; the emulator runtime apart)."""
    return sorted(p for p in (CSRC / "cuda").glob("*.cpp") if p.name not in ("emulator.cpp", "plan.cpp"))


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension plus one step before it: the per-ISA CPU kernel objects, built by
    ninja (incremental, parallel) with their own flags, then linked into _C as extra objects."""

    def initialize_options(self):
        super().initialize_options()
        if SANITIZE:  # the sanitized objects never mix with (or replace) the normal build's
            self.build_temp = str(ROOT / "build" / "sanitize")

    def build_extensions(self):
        objects = self.build_isa_objects()
        for ext in self.extensions:
            ext.extra_objects = objects + list(ext.extra_objects or [])
        super().build_extensions()

    def build_isa_objects(self):
        """Also the SIMT emulator's objects (BMK_CUDA_EMULATOR=1): every CUDA kernel source and its glue
        compiled by g++ with -DBMK_CUDA_EMULATOR, plus the emulator runtime."""
        out_dir = Path(self.build_temp).resolve() / "isa"
        out_dir.mkdir(parents=True, exist_ok=True)
        includes = [str(CSRC)] + cpp_extension.include_paths()
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        common = CXX_FLAGS + ["-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"] + [f"-I{d}" for d in includes]
        cxx = os.environ.get("CXX", "c++")
        lines = [
            f"cxx = {cxx}",
            "cflags = " + " ".join(common),
            "rule compile",
            "  command = $cxx -MMD -MF $out.d $cflags $isaflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = CXX $out",
        ]
        objects = []
        for src in isa_kernel_sources():
            for isa, flags in CPU_ISAS.items():
                obj = out_dir / f"{src.stem}.{isa}.o"
                objects.append(str(obj))
                isa_flags = [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"] + flags
                lines += [f"build {obj}: compile {src}", "  isaflags = " + " ".join(isa_flags)]
        if env_flag("BMK_CUDA_EMULATOR"):
            emulated = cuda_kernel_sources() + cuda_glue_sources() + [CSRC / "cuda" / "emulator.cpp"]
            for src in emulated:
                obj = out_dir / f"cuda_emulated.{src.stem}{'.cu' if src.suffix == '.cu' else ''}.o"
                objects.append(str(obj))
                lines += [f"build {obj}: compile {src}", "  isaflags = -DBMK_CUDA_EMULATOR -x c++"]
        (out_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        subprocess.check_call(["ninja", "-C", str(out_dir), "-j", max_jobs()])
        return objects


def make_extension():
    cuda_home = cuda_plan()
    # Schemas, the CPU dispatch and the device-independent autograd kernels; compiled once.
    sources = [
        CSRC / "registration.cpp",
        *(CSRC / "cpu" / name for name in CPU_ONCE),
        *sorted((CSRC / "autograd").glob("*.cpp")),
        CSRC / "cuda" / "plan.cpp",
    ]
    sources = [str(p.relative_to(ROOT)) for p in sources]
    isa_names = ",".join("scalar" if isa == "DEFAULT" else isa.lower() for isa in CPU_ISAS)
    emulated = ["-DBMK_CUDA_EMULATED"] if env_flag("BMK_CUDA_EMULATOR") else []  # build_info reports it
    cxx = CXX_FLAGS + [f"-DBMK_CPU_ISAS={isa_names}"] + emulated
    include_dirs = [str(CSRC)]
    if cuda_home is None:
        return cpp_extension.CppExtension(
            "bmkernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"] + SANITIZE,
        )
    # torch.utils.cpp_extension reads CUDA_HOME at import; point it at the real toolkit
    cpp_extension.CUDA_HOME = cuda_home
    os.environ["CUDA_HOME"] = cuda_home
    archs = cuda_arch_list()
    cu_sources = [str(p.relative_to(ROOT)) for p in cuda_kernel_sources() + cuda_glue_sources()]
    arch_names = archs.replace(";", ",").replace(" ", ",")
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v"]
    return cpp_extension.CUDAExtension(
        "bmkernels._C",
        sources + cu_sources,
        include_dirs=include_dirs + nvidia_pip_include_dirs(),
        extra_compile_args={"cxx": cxx + [f"-DBMK_CUDA_ARCHS={arch_names}"], "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["bmkernels", "bmkernels.*"]),
    package_data={"bmkernels": ["py.typed"]},  # PEP 561: the package ships its type hints
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
