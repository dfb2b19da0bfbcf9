"""
Builds the `conditional_detr._C` extension from csrc/: CPU kernels always, CUDA kernels when a
CUDA toolkit matching torch's CUDA is found (or FORCE_CUDA=1). Environment:

    FORCE_CUDA=1            build the CUDA kernels or fail; FORCE_CUDA=0 never builds them
    CUDA_HOME=/path         the toolkit root (bin/nvcc, lib64/libcudart.so); detected otherwise
    TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;9.0"
    MAX_JOBS                parallel compile jobs (ninja)

Without torch importable at build time (use `pip install --no-build-isolation`), the package
installs without the extension and runs on its pure-PyTorch ops.
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _is_toolkit_root(path):
    # A wrapper script named nvcc (e.g. /usr/local/bin/nvcc) must not pass for a toolkit:
    # the root also has to hold the runtime library that extensions link against.
    return (
        path
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and any(
            os.path.exists(os.path.join(path, lib, "libcudart.so"))
            for lib in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))
        )
    )


def find_cuda_home():
    """The CUDA toolkit root, or None. Prefers $CUDA_HOME / $CUDA_PATH when they are set."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path:
            if not _is_toolkit_root(path):
                raise RuntimeError(
                    f"{var}={path} is not a CUDA toolkit root (expected bin/nvcc and lib64/libcudart.so)"
                )
            return path
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    candidates += ["/opt/cuda", "/usr/lib/cuda"]
    nvcc = _which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for path in candidates:
        if _is_toolkit_root(path):
            return path
    return None


def _which(program):
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def nvcc_version(cuda_home):
    text = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    match = re.search(r"release (\d+)\.(\d+)", text)
    if not match:
        raise RuntimeError(f"cannot read the CUDA version from `nvcc --version`:\n{text}")
    return int(match.group(1)), int(match.group(2))


def cuda_build_plan():
    """(cuda_home or None, reason): whether to compile the CUDA kernels, and why (not)."""
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return None, "FORCE_CUDA=0"
    forced = force == "1"
    import torch

    cuda_home = find_cuda_home()
    if cuda_home is None:
        if forced:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found; set CUDA_HOME")
        return None, "no CUDA toolkit found"
    if torch.version.cuda is None:
        if forced:
            raise RuntimeError(
                f"FORCE_CUDA=1 but torch {torch.__version__} is built without CUDA; "
                "install a CUDA build of torch or unset FORCE_CUDA"
            )
        return None, f"torch {torch.__version__} has no CUDA"
    toolkit = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if toolkit[0] != torch_major:
        raise RuntimeError(
            f"the CUDA toolkit at {cuda_home} is {toolkit[0]}.{toolkit[1]} but torch "
            f"{torch.__version__} uses CUDA {torch.version.cuda}; the major versions must match. "
            "Point CUDA_HOME at a matching toolkit, or set FORCE_CUDA=0 for a CPU-only build."
        )
    return cuda_home, f"CUDA {toolkit[0]}.{toolkit[1]} at {cuda_home}"


def extension_modules():
    try:
        import torch  # noqa: F401
    except ImportError:
        print(
            "conditional_detr: torch is not importable at build time, building without the "
            "compiled ops (install with --no-build-isolation to build them)",
            file=sys.stderr,
        )
        return [], {}

    cuda_home, reason = cuda_build_plan()
    if cuda_home is not None:
        # cpp_extension reads CUDA_HOME when it is imported; a guess from PATH could land on
        # a wrapper script's folder instead of the toolkit.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # as torch builds its own kernels: without these, GCC will not vectorize the exp and
    # select loops of the CPU softmax
    # -fopenmp: ATen's parallel_for is inlined into this extension and runs serially
    # unless its OpenMP pragmas are compiled in
    extra_compile_args = {"cxx": ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]}
    define_macros = []
    if cuda_home is not None:
        print(f"conditional_detr: building CPU and CUDA kernels ({reason}, archs "
              f"{os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        # no --use_fast_math: the sine embedding needs accurate sincos, and exp2f is fast as is
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]
        define_macros.append(("WITH_CUDA", None))
        extension = CUDAExtension
    else:
        print(f"conditional_detr: building CPU kernels only ({reason})", file=sys.stderr)
        extension = CppExtension
    module = extension(
        "conditional_detr._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
    )
    return [module], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def model_zoo_configs():
    """configs/*.yaml, shipped as conditional_detr/model_zoo/configs (a link to configs/ here)."""
    configs = os.path.join(ROOT, "configs")
    return [
        os.path.join("configs", os.path.relpath(path, configs))
        for path in glob.glob(os.path.join(configs, "**", "*.yaml"), recursive=True)
    ]


ext_modules, cmdclass = extension_modules()

setup(
    name="conditional_detr",
    version="0.1.0",
    description="Conditional DETR as a detectron2 project",
    packages=find_packages(exclude=("tests", "configs")),
    package_data={"conditional_detr.model_zoo": model_zoo_configs()},
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
