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


# CUDA C sums for `raw_kernel` sources: over a warp, and two at once over a thread block.
BLOCK_SUMS = r"""
__device__ __forceinline__ T warp_sum(T x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// The sums of a and b over the block, returned to every thread (blockDim.x a multiple of 32,
// `partials` a __shared__ T[64]).
__device__ void block_sum2(T& a, T& b, T* partials) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();  // the previous call's readers are done with `partials`
    if (lane == 0) {
        partials[warp] = a;
        partials[32 + warp] = b;
    }
    __syncthreads();
    const bool mine = lane < (blockDim.x >> 5);
    a = warp_sum(mine ? partials[lane] : T(0));
    b = warp_sum(mine ? partials[32 + lane] : T(0));
}
"""

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


def one_wave(kernel, threads: int, work: int) -> int:
    """Blocks of `threads` threads for `work` units of a RawKernel: one each, but no more than
    the GPU holds at once (`resident_blocks` on every multiprocessor), and at least 1."""
    return max(1, min(work, multiprocessors() * resident_blocks(kernel, threads)))


_TILE, _TILE_ROWS = 32, 8
_FROM_TRANSPOSED = r"""
// y [L, R, C] = f^T, f [L, C, R] C-contiguous; with ADD, y = z + f^T + b, z [L, R, C] and
// b[r sr + c sc]. A block moves one TILE x TILE tile: it reads f's along r, writes y's along c.
extern "C" __global__ void wm_from_transposed(
        const T* f, const T* z, const T* b, T* y, const long long R, const long long C,
        const long long sr, const long long sc) {
    __shared__ T tile[TILE][TILE + 1];  // [c, r]; + 1: no shared-memory bank conflicts
    const long long plane = (long long)blockIdx.z * R * C;
    const long long r0 = (long long)blockIdx.x * TILE, c0 = (long long)blockIdx.y * TILE;
    for (int k = threadIdx.y; k < TILE; k += TILE_ROWS) {
        const long long c = c0 + k, r = r0 + threadIdx.x;
        if (c < C && r < R) tile[k][threadIdx.x] = f[plane + c * R + r];
    }
    __syncthreads();
    for (int k = threadIdx.y; k < TILE; k += TILE_ROWS) {
        const long long r = r0 + k, c = c0 + threadIdx.x;
        if (r < R && c < C) {
            const long long i = plane + r * C + c;
#if ADD
            y[i] = z[i] + tile[threadIdx.x][k] + b[r * sr + c * sc];
#else
            y[i] = tile[threadIdx.x][k];
#endif
        }
    }
}
"""


def from_transposed(f, z=None, bias=None):
    """A C-contiguous copy of f [.., R, C], the transposed view of a C-contiguous [.., C, R]
    device array; or, given z [.., R, C] (C-contiguous) and `bias` (broadcasting over
    [R, C]), z + f + bias in the same pass. Shared-memory tiles read f along r and write
    along c, so both sides move through memory in order (CuPy's copy reads f C elements
    apart: a transposing copy ran at about a third of the memory's rate)."""
    R, C = f.shape[-2:]
    dtype = f.dtype if z is None else z.dtype
    source = _cupy.ascontiguousarray(f.swapaxes(-1, -2), dtype=dtype)  # [.., C, R]: a view
    y = _cupy.empty(f.shape, dtype=dtype)  # [.., R, C]
    add = z is not None
    b = _cupy.broadcast_to(_cupy.asarray(bias, dtype=dtype), (R, C)) if add else y  # [R, C]
    if y.size:
        raw_kernel("wm_from_transposed", _FROM_TRANSPOSED, dtype,
                   {"TILE": _TILE, "TILE_ROWS": _TILE_ROWS, "ADD": int(add)})(
            (-(-R // _TILE), -(-C // _TILE), y.size // (R * C)), (_TILE, _TILE_ROWS),
            (source, z if add else y, b, y, np.int64(R), np.int64(C),
             np.int64(b.strides[0] // b.itemsize), np.int64(b.strides[1] // b.itemsize)))
    return y


_SUM_SQ = BLOCK_SUMS + r"""
// partial[block] = the block's sum of g^2 over g [n]: the first `head` elements one at a time,
// the rest (16-byte aligned) as VEC loads of WIDTH elements, the last (n - head) % WIDTH by the
// first threads.
extern "C" __global__ void wm_sum_sq(const T* g, T* partial, const long long n, const int head) {
    __shared__ T partials[64];
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const T* body = g + head;
    const long long m = n - head;
    const VEC* vectors = reinterpret_cast<const VEC*>(body);
    T s = first < head ? g[first] * g[first] : T(0), s2 = T(0);
    for (long long i = first; i < m / WIDTH; i += 2 * stride) {  // two loads in flight
        const VEC v = vectors[i];
        s += SQUARES;
        if (i + stride < m / WIDTH) {
            const VEC v = vectors[i + stride];
            s2 += SQUARES;
        }
    }
    const long long k = m / WIDTH * WIDTH + first;
    if (k < m) s += body[k] * body[k];
    block_sum2(s, s2, partials);
    s += s2;
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
"""
_VECTORS = {np.dtype(np.float32): {"VEC": "float4", "WIDTH": 4,
                                   "SQUARES": "v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w"},
            np.dtype(np.float64): {"VEC": "double2", "WIDTH": 2,
                                   "SQUARES": "v.x * v.x + v.y * v.y"}}
_SUM_SQ_THREADS = 256


def sum_of_squares(arrays):
    """[1]: the sum of g^2 over every element of every array, an array of their module (no
    read-back). On GPUs one kernel per array reads it in 16-byte loads, as many blocks as
    fill the GPU once, each block writing its partial sum (CuPy's vdot writes the products
    out first, and its reductions read 4 bytes a load); the partial sums of all arrays are
    added in one more kernel. The order of the sums is fixed, so the result is
    deterministic. On the host, BLAS dot products."""
    arrays = list(arrays)
    if not arrays or not is_device_array(arrays[0]):
        return np.array([sum(float(np.vdot(g.ravel(), g.ravel())) for g in arrays)])
    dtype = np.dtype(arrays[0].dtype)
    kernel = raw_kernel("wm_sum_sq", _SUM_SQ, dtype, _VECTORS[dtype])
    width = _VECTORS[dtype]["WIDTH"]
    flats = [_cupy.ascontiguousarray(g, dtype=dtype).reshape(-1) for g in arrays]
    blocks = [one_wave(kernel, _SUM_SQ_THREADS, -(-g.size // (width * _SUM_SQ_THREADS)))
              for g in flats]
    parts = _cupy.zeros(sum(blocks), dtype=dtype)  # [blocks of every array]
    start = 0
    for g, n in zip(flats, blocks):
        head = min(g.size, (16 - g.data.ptr % 16) % 16 // dtype.itemsize)
        if g.size:
            kernel((n,), (_SUM_SQ_THREADS,), (g, parts[start:], np.int64(g.size), np.int32(head)))
        start += n
    return parts.sum().reshape(1)


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
    bounds = list(range(0, n, grain)) + [n]
    if threads <= 1:
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            work(lo, hi)
        return
    if _HOST_POOL is None or _HOST_POOL._max_workers < threads:
        import concurrent.futures
        _HOST_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=threads)
    for f in [_HOST_POOL.submit(work, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        f.result()
