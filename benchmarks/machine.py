"""What a benchmark measured with: the machine, the MLX backend and device, and the BLAS behind MLX's
CPU matmuls. Every script in benchmarks/ prints `describe()` first, so a figure always travels with
its context (docs/benchmarks.md).

The BLAS is the library that MLX's `cblas_sgemm` resolves to: a preloaded one (`LD_PRELOAD`) comes
first in the global symbol scope and wins over the one the mlx[cpu] wheel bundles (a reference BLAS,
many times slower). numpy's own BLAS (numpy.libs) is not MLX's and is not reported. A preload whose
file is missing is dropped by the dynamic loader with one easily missed line; describe() says so
with a WARNING line, because the figures measured with OpenBLAS are then not reproduced.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import platform
import sys

OPENBLAS_INSTALL = "apt-get update && apt-get install -y libopenblas0-pthread"


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _global_provider(symbol: str) -> str | None:
    """The file that provides `symbol` in the process's global scope (executable, LD_PRELOAD, their
    dependencies), or None: then a dlopen'ed library such as libmlx.so uses its own dependency."""
    try:
        scope = ctypes.CDLL(None)
        fn = getattr(scope, symbol)
        dladdr = scope.dladdr
    except (AttributeError, OSError):
        return None
    info = _DlInfo()
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    if not dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _mapped_blas() -> list[str]:
    """BLAS-like shared libraries mapped into this process (Linux), numpy's and scipy's own left out."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    keys = ("blas", "mkl_rt", "libmkl", "blis", "accelerate")
    return sorted(p for p in paths if ".so" in p and any(k in os.path.basename(p).lower() for k in keys)
                  and "numpy.libs" not in p and "scipy.libs" not in p and "lapack" not in os.path.basename(p))


def _openblas_details(path: str) -> str:
    try:
        lib = ctypes.CDLL(path)
        lib.openblas_get_config.restype = ctypes.c_char_p
        config = lib.openblas_get_config().decode()
        threads = lib.openblas_get_num_threads()
    except (OSError, AttributeError):
        return "OpenBLAS"
    return f"{config.split(' NO_')[0].split(' USE_')[0]}, {threads} thread{'s' if threads != 1 else ''}"


def blas() -> str:
    """The BLAS that MLX's CPU matmuls call, in words."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    importlib.import_module("mlx.core")  # loads libmlx.so and the BLAS it links

    preload = [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    provider = _global_provider("cblas_sgemm")
    if provider is None:  # no global sgemm: libmlx.so's own dependency
        own = [p for p in _mapped_blas() if "mlx" in p] or _mapped_blas()
        provider = own[0] if own else None
        how = "linked by MLX"
    else:
        how = "preloaded" if any(os.path.realpath(p) == provider for p in preload) else "global"
    if provider is None:
        return "unknown (no cblas_sgemm found)"
    name = os.path.basename(provider)
    if "openblas" in name.lower():
        kind = _openblas_details(provider)
    elif "mkl" in name.lower():
        kind = "Intel MKL"
    elif "mlx_cpu.libs" in provider or name.startswith("libblas"):
        kind = "reference BLAS (netlib) bundled with the mlx[cpu] wheel: slow matmuls"
    else:
        kind = name
    return f"{kind} [{how}: {provider}]"


def backend() -> str:
    """MLX's version, default device and which accelerators it can use."""
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    cuda_ok = bool(cuda is not None and hasattr(cuda, "is_available") and cuda.is_available())
    return (f"MLX {mx.__version__}, default device {mx.default_device()} "
            f"(Metal {'yes' if mx.metal.is_available() else 'no'}, CUDA {'yes' if cuda_ok else 'no'})")


def warnings() -> list[str]:
    out = []
    for p in [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if p]:
        if not os.path.exists(p):
            out.append(f"WARNING: LD_PRELOAD={p} does not exist, so the preload was ignored and these figures "
                       f"are not measured with it. Debian/Ubuntu: `{OPENBLAS_INSTALL}` (docs/benchmarks.md)")
    return out


def describe() -> str:
    """One line (plus WARNING lines) for the top of a benchmark's output."""
    line = (f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()} | {backend()} | BLAS: {blas()}")
    return "\n".join([line, *warnings()])


if __name__ == "__main__":
    print(describe())
