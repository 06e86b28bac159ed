"""numpy / CuPy dispatch: the only module of the package that imports cupy.

Every function that allocates starts with `xp = get_array_module(x)`, so one code path
serves host (numpy) and device (CuPy) arrays. Host transfers go through `to_host`.
"""
from __future__ import annotations

import functools

import numpy as np

try:  # CuPy is optional: the package runs on numpy alone.
    import cupy as _cupy
except Exception:  # ImportError, or a CuPy without a usable CUDA runtime
    _cupy = None


def cupy_available() -> bool:
    """True where CuPy imports and sees at least one GPU."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def get_array_module(*arrays):
    """numpy or cupy, whichever owns the arrays (numpy for host arrays and scalars)."""
    if _cupy is not None:
        return _cupy.get_array_module(*arrays)
    return np


def is_device_array(x) -> bool:
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def to_host(x) -> np.ndarray:
    """The one device-to-host copy of the package (a no-op for numpy arrays)."""
    if is_device_array(x):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def module(name: str):
    """The array module called `name` ("numpy" or "cupy")."""
    if name == "numpy":
        return np
    if name == "cupy":
        if not cupy_available():
            raise RuntimeError("device 'cupy' was asked for, but CuPy or a GPU is not available")
        return _cupy
    raise ValueError(f"unknown array module {name!r} (use 'numpy' or 'cupy')")


def to_module(x, xp):
    """`x` as an array of module `xp` (host to device, device to host, or unchanged)."""
    if xp is np:
        return to_host(x)
    return xp.asarray(x)


def host_to_device(xp):
    """A function, for a reader thread, that moves host arrays to the device the caller of
    `host_to_device` uses: through page-locked buffers (a DMA copy) on a stream of its own,
    returning once they are there, so a step finds its batch on the device without waiting
    for the copy. The identity for numpy."""
    if xp is np:
        return lambda *arrays: arrays
    import cupyx
    device, stream = _cupy.cuda.Device().id, _cupy.cuda.Stream(non_blocking=True)

    def copy(*arrays):
        with _cupy.cuda.Device(device), stream:
            out, staged = [], []
            for a in arrays:
                pinned = cupyx.empty_pinned(a.shape, a.dtype)  # from CuPy's pinned pool
                pinned[...] = a
                d = _cupy.empty(a.shape, a.dtype)
                d.set(pinned, stream=stream)
                out.append(d)
                staged.append(pinned)
            stream.synchronize()  # the pinned buffers may go back to their pool now
        return tuple(out)

    return copy


def synchronize(xp) -> None:
    """Wait for the device's queued work (a no-op for numpy), before reading a host clock."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def set_matmul_precision(xp, precision: str) -> None:
    """"tf32": float32 GEMMs on the tensor cores in TF32 (CuPy, Ampere or newer); "fp32": full
    float32. Both of CuPy's GEMM paths follow it: its matmul and `cupy.cublas.gemm` (the
    accumulating products of `linear.matmul`). Call after choosing the device, before the first
    matmul. numpy has no TF32: only "fp32" means anything there."""
    if precision not in ("tf32", "fp32"):
        raise ValueError(f"precision {precision!r}: choose tf32 or fp32")
    if xp is np:
        return
    from cupy._core import _routines_linalg as linalg
    from cupy_backends.cuda.libs import cublas
    mode = linalg.COMPUTE_TYPE_TF32 if precision == "tf32" else linalg.COMPUTE_TYPE_DEFAULT
    linalg.set_compute_type(np.float32, mode)  # CuPy's matmul (cublasGemmEx)
    math = (getattr(cublas, "CUBLAS_TF32_TENSOR_OP_MATH", 3) if precision == "tf32" else
            getattr(cublas, "CUBLAS_DEFAULT_MATH", 0))
    cublas.setMathMode(xp.cuda.device.get_cublas_handle(), math)  # cupy.cublas.gemm (sgemm)


_KERNELS: dict = {}


def elementwise_kernel(name: str, in_params: str, out_params: str, body: str,
                       preamble: str = ""):
    """A cached CuPy ElementwiseKernel: one pass over memory for a fused elementwise formula
    (`preamble`: CUDA C device functions the body calls). Callers keep the same formula in
    numpy beside it for host arrays (and the GPU tests compare the two in float64)."""
    if name not in _KERNELS:
        _KERNELS[name] = _cupy.ElementwiseKernel(in_params, out_params, body, name,
                                                 preamble=preamble)
    return _KERNELS[name]


_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def raw_kernel(name: str, source: str, dtype=np.float32, defines: dict | None = None):
    """A cached CuPy RawKernel: the function `name` of the CUDA C `source`, compiled with T the
    C type of `dtype` and `defines` as preprocessor constants. For work an elementwise
    formula cannot express (a row's reductions in registers); the caller keeps the numpy form
    of the same formulas beside it, and the GPU tests compare the two in float64."""
    defines = dict(defines or {})
    key = (name, np.dtype(dtype).name, tuple(sorted(defines.items())))
    if key not in _KERNELS:
        head = f"typedef {_C_TYPES[np.dtype(dtype)]} T;\n" + "".join(
            f"#define {k} {v}\n" for k, v in sorted(defines.items()))
        _KERNELS[key] = _cupy.RawKernel(head + source, name)
    return _KERNELS[key]


@functools.lru_cache(maxsize=None)
def _device_attributes(device: int) -> dict:
    """CUDA's attributes of GPU `device` (CuPy queries each of them anew on every call)."""
    return _cupy.cuda.Device(device).attributes


def multiprocessors() -> int:
    """The current GPU's streaming multiprocessors."""
    return _device_attributes(_cupy.cuda.Device().id)["MultiProcessorCount"]


_RESIDENT: dict = {}


def resident_blocks(kernel, threads: int) -> int:
    """About how many blocks of `threads` threads of a RawKernel (one of `raw_kernel`'s, which
    live as long as the process) one multiprocessor holds at once, from the kernel's registers
    per thread and its block's threads (at least 1). Worked out once per kernel and size."""
    device = _cupy.cuda.Device().id
    key = (id(kernel), threads, device)
    if key not in _RESIDENT:
        regs = max(1, kernel.attributes.get("num_regs", 128))
        limits = _device_attributes(device)
        by_threads = limits.get("MaxThreadsPerMultiProcessor", 2048) // threads
        by_registers = limits.get("MaxRegistersPerMultiprocessor", 65536) // (regs * threads)
        _RESIDENT[key] = max(1, min(by_threads, by_registers,
                                    limits.get("MaxBlocksPerMultiprocessor", 16)))
    return _RESIDENT[key]


_ROW = 1 << 16  # elements per row of a device sum of squares (see sum_of_squares)


def sum_of_squares(arrays):
    """[1]: the sum of g^2 over every element of every array, an array of their module (no
    read-back). On GPUs each array is summed as rows of a [n / 65536, 65536] view by one
    reduction kernel that squares on the fly (CuPy's vdot writes the products out first, and
    its reduction kernels give a whole array to a single thread block), plus its remainder;
    the partial sums of all arrays are added in one more kernel. On the host, BLAS dot
    products."""
    arrays = list(arrays)
    if not arrays or not is_device_array(arrays[0]):
        return np.array([sum(float(np.vdot(g.ravel(), g.ravel())) for g in arrays)])
    if "wm_sum_sq" not in _KERNELS:
        _KERNELS["wm_sum_sq"] = _cupy.ReductionKernel("T g", "T s", "g * g", "a + b", "s = a",
                                                      "0", "wm_sum_sq")
    square_sum, parts = _KERNELS["wm_sum_sq"], []
    for g in arrays:
        flat = _cupy.ascontiguousarray(g).reshape(-1)
        cut = flat.size // _ROW * _ROW
        if cut:
            parts.append(square_sum(flat[:cut].reshape(-1, _ROW), axis=1))  # [n // 65536]
        if cut < flat.size:
            parts.append(square_sum(flat[cut:]).reshape(1))
    return _cupy.concatenate(parts).sum().reshape(1)


def tune_host_allocator() -> bool:
    """Keep freed large blocks in the process (glibc malloc): numpy's temporaries of a step are
    then reused instead of being returned to the system and faulted in again on every call.
    Sets M_MMAP_THRESHOLD = 32 MiB and M_TRIM_THRESHOLD = 1 GiB through mallopt; a no-op
    (returns False) where the C library is not glibc. The command-line tools call it once."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


_HOST_POOL = None
GRAIN = 1 << 17  # elements per task: about 512 KiB of float32, a chunk that stays in L2


def host_threads() -> int:
    """Threads for host elementwise work: OMP_NUM_THREADS where set (as for the BLAS), else the
    cores this process may use."""
    import os
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parallel_ranges(n: int, work, grain: int = GRAIN, threads: int | None = None) -> None:
    """Call work(lo, hi) over [0, n) in chunks of about `grain`, on host threads (default
    `host_threads()`). numpy's loops release the GIL, so a chain of in-place operations on one
    L2-sized chunk runs on one core while the other chunks run on the others. `work` writes
    into preallocated outputs. threads=1 keeps the chunking (cache locality) on one thread."""
    global _HOST_POOL
    threads = min(host_threads() if threads is None else threads, -(-n // grain))
    if threads <= 1:
        work(0, n)
        return
    if _HOST_POOL is None or _HOST_POOL._max_workers < threads:
        import concurrent.futures
        _HOST_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
    bounds = list(range(0, n, grain)) + [n]
    for f in [_HOST_POOL.submit(work, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        f.result()
