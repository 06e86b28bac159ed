"""The backward GEMMs of a C1 mixer block, each in the layouts the model hands to cuBLAS and in
alternatives (both operands made C-contiguous; the transposed product C^T = B^T A^T written
into a transposed output), timed alone with CUDA events (median of 7, TF32).

    python benchmarks/gpu_gemms.py

Prints ms and TFLOP/s per variant: which layout makes cuBLAS pick a slow kernel.
"""
from __future__ import annotations

import numpy as np
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from weathermixer.autograd import xp as xpmod  # noqa: E402
from weathermixer.autograd.linear import contract_leading, matmul  # noqa: E402
from weathermixer.mixer.bench import gemm_tflops, seconds  # noqa: E402

T, E, Mt, Mc, R = 17280, 4320, 8640, 4320, 4140


def main():
    cp = xpmod.module("cupy")
    xpmod.set_matmul_precision(cp, "tf32")
    rng = cp.random.default_rng(0)

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def ms(fn):
        fn()
        return 1e3 * float(np.median([seconds(cp, fn) for _ in range(7)]))

    print(f"large GEMM {gemm_tflops(cp, 'float32', 8192):.0f} TFLOP/s")
    te, em, tc = r(1, T, E), r(1, E, Mt), r(1, T, Mc)
    w_em, w_mt, w_te = r(E, Mc), r(Mt, T), r(T, Mt)
    w_me = r(Mc, E)
    tr, t2e, w_r2e = r(1, T, R), r(1, T, 2 * E), r(R, 2 * E)
    cases = {
        # channel fc2 backward: dy [T, E], W [E, Mc], x [T, Mc]
        "ch fc2 dX = dy W  [T,E][E,Mc]": (lambda: matmul(te, w_em), T * E * Mc),
        "ch fc2 dW = dy^T x  [E,T][T,Mc]": (lambda: contract_leading(te, tc), T * E * Mc),
        "ch fc2 dW^T = x^T dy (alt)": (lambda: contract_leading(tc, te), T * E * Mc),
        "ch fc2 dW, dy^T copied to C (alt)": (lambda: cp.ascontiguousarray(te[0].T) @ tc[0],
                                              T * E * Mc),
        "ch fc2 dW, x copied to F (alt)": (lambda: te[0].T @ cp.asfortranarray(tc[0]),
                                           T * E * Mc),
        "ch fc2 dW, both copied (alt)": (lambda: cp.ascontiguousarray(te[0].T)
                                         @ cp.asfortranarray(tc[0]), T * E * Mc),
        # channel fc1 backward: dy [T, Mc], W [Mc, E], x [T, E]
        "ch fc2 dX, W copied to F (alt)": (lambda: matmul(te, cp.asfortranarray(w_em)),
                                           T * E * Mc),
        "ch fc1 dX = dy W  [T,Mc][Mc,E]": (lambda: matmul(tc, w_me), T * E * Mc),
        "ch fc1 dX, W copied to F (alt)": (lambda: matmul(tc, cp.asfortranarray(w_me)),
                                           T * E * Mc),
        "ch fc1 dW = dy^T x  [Mc,T][T,E]": (lambda: contract_leading(tc, te), T * E * Mc),
        # token fc2 backward: dy = [E, T] view of [T, E], W [T, Mt], x = h1 [E, Mt]
        "tok fc2 dX = dy W (dy a view)": (lambda: matmul(te.swapaxes(-1, -2), w_te,
                                                         out=cp.empty_like(em)), T * E * Mt),
        "tok fc2 dX, dy contiguous (alt)": (lambda: matmul(cp.ascontiguousarray(
            te.swapaxes(-1, -2)), w_te), T * E * Mt),
        "tok fc2 dW = dy^T h1 (view)": (lambda: contract_leading(te.swapaxes(-1, -2), em),
                                        T * E * Mt),
        "tok fc2 dW^T = h1^T dy (alt)": (lambda: em[0].T @ te[0].T, T * E * Mt),
        "tok fc2 dW, h1 copied to F (alt)": (lambda: te[0] @ cp.asfortranarray(em[0]),
                                             T * E * Mt),
        # token fc1 backward: dy [E, Mt], W [Mt, T], x = [E, T] view of [T, E]
        "tok fc1 dX into token-major": (lambda: matmul(em, w_mt, out=cp.empty_like(
            te).swapaxes(-1, -2)), T * E * Mt),
        "tok fc1 dX C-order (alt)": (lambda: matmul(em, w_mt), T * E * Mt),
        "tok fc1 dX, W copied to F (alt)": (lambda: matmul(em, cp.asfortranarray(w_mt)),
                                            T * E * Mt),
        "tok fc2 dX, dy and W copied (alt)": (lambda: matmul(cp.ascontiguousarray(
            te.swapaxes(-1, -2)), cp.asfortranarray(w_te)), T * E * Mt),
        "tok fc1 dW = dy^T x (x a view)": (lambda: contract_leading(em, te.swapaxes(-1, -2)),
                                           T * E * Mt),
        "tok fc1 dW^T = x^T dy (alt)": (lambda: te[0] @ em[0], T * E * Mt),
        # recovery backward: dy [T, R] (R = V pl pw = 4140), W [R, 2E], x [T, 2E]
        "rec dX = dy W  [T,R][R,2E]": (lambda: matmul(tr, w_r2e), T * R * 2 * E),
        "rec dW = dy^T x  [R,T][T,2E]": (lambda: contract_leading(tr, t2e), T * R * 2 * E),
        "rec dW, dy^T copied to C (alt)": (lambda: cp.ascontiguousarray(tr[0].T) @ t2e[0],
                                           T * R * 2 * E),
        "rec dW, x copied to F (alt)": (lambda: tr[0].T @ cp.asfortranarray(t2e[0]),
                                        T * R * 2 * E),
        "rec dX, W copied to F (alt)": (lambda: tr[0] @ cp.asfortranarray(w_r2e), T * R * 2 * E),
        "rec fwd  [T,2E][2E,R]": (lambda: matmul(t2e, w_r2e.T), T * R * 2 * E),
        # forward, for reference
        "tok fc1 fwd  [E,T][T,Mt]": (lambda: matmul(te.swapaxes(-1, -2), w_mt.T), T * E * Mt),
        "ch fc1 fwd  [T,E][E,Mc]": (lambda: matmul(te, w_me.T), T * E * Mc),
    }
    print(f"{'GEMM':36} {'ms':>7} {'TFLOP/s':>8}")
    for name, (fn, mnk) in cases.items():
        t = ms(fn)
        print(f"{name:36} {t:>7.2f} {2 * mnk / t / 1e9:>8.0f}")


if __name__ == "__main__":
    main()
