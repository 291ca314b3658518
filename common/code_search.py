"""Exact nearest-code search on the CPU, compiled with numba.

A residual quantizer spends nearly all of its inference time finding, for each vector, the
nearest of K codes, level after level on what the previous levels left over. In the latent
dimensions tokenizers use (about 8) no tree or clustering prunes codes well (the residuals
fill the space), so the search here is brute force, made cheap by doing it where the data
stay in cache:

  - the squared distance |x|^2 + |c|^2 - 2 x.c of 4 vectors to one code at a time (so each
    code that is loaded from memory serves 4 vectors), vectorised over codes, codebooks
    transposed to (dim, K);
  - the argmin on the float32 bit patterns of the (non-negative) distances: integers order
    like non-negative floats, and an integer min vectorises where a float min does not;
  - vectors split over threads (numba prange).

The result is the exact nearest code (the first one on ties), as `torch.argmin` of the matmul
distances gives it up to float32 rounding of near-ties. With cosine similarity (unit vectors x)
|c|^2 is replaced by max |c|^2, which turns max x.c into a search on non-negative values.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

TILE = 4  # vectors per tile: each code loaded serves this many (fixed: the kernel is unrolled for 4)
BLOCK = 256  # vectors per parallel work item (its buffers are allocated once)
CHUNK = 8  # latent dimensions per pass (the kernel is unrolled for 8; larger dims take several)


@njit(fastmath=True, cache=True)
def _dot8(w, v0, v1, v2, v3, v4, v5, v6, v7):
    return w[0] * v0 + w[1] * v1 + w[2] * v2 + w[3] * v3 + w[4] * v4 + w[5] * v5 + w[6] * v6 + w[7] * v7


@njit(fastmath=True, cache=True)
def _rows(a):
    """The 4 x 8 array a as a tuple of tuples of values."""
    return ((a[0, 0], a[0, 1], a[0, 2], a[0, 3], a[0, 4], a[0, 5], a[0, 6], a[0, 7]),
            (a[1, 0], a[1, 1], a[1, 2], a[1, 3], a[1, 4], a[1, 5], a[1, 6], a[1, 7]),
            (a[2, 0], a[2, 1], a[2, 2], a[2, 3], a[2, 4], a[2, 5], a[2, 6], a[2, 7]),
            (a[3, 0], a[3, 1], a[3, 2], a[3, 3], a[3, 4], a[3, 5], a[3, 6], a[3, 7]))


@njit(fastmath=True, cache=True)
def _distances(c, base, w, d, first):
    """One 8-dimension chunk for 4 vectors: d[q, j] = start + w[q].c_j, where w holds -2 x_q and
    start is |x_q|^2 + |c_j|^2 for the first chunk (base = (|x_0|^2, .., |x_3|^2, |c|^2)), else the
    sum so far. Vectorised over the codes j; w and the |x|^2 are tuples (values, not memory), so
    nothing in the loop can alias the stores."""
    c0, c1, c2, c3, c4, c5, c6, c7 = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
    d0, d1, d2, d3 = d[0], d[1], d[2], d[3]
    w0, w1, w2, w3 = w
    for j in range(c0.shape[0]):
        v0, v1, v2, v3, v4, v5, v6, v7 = c0[j], c1[j], c2[j], c3[j], c4[j], c5[j], c6[j], c7[j]
        if first:
            s = base[4][j]
            t0, t1, t2, t3 = base[0] + s, base[1] + s, base[2] + s, base[3] + s
        else:
            t0, t1, t2, t3 = d0[j], d1[j], d2[j], d3[j]
        d0[j] = t0 + _dot8(w0, v0, v1, v2, v3, v4, v5, v6, v7)
        d1[j] = t1 + _dot8(w1, v0, v1, v2, v3, v4, v5, v6, v7)
        d2[j] = t2 + _dot8(w2, v0, v1, v2, v3, v4, v5, v6, v7)
        d3[j] = t3 + _dot8(w3, v0, v1, v2, v3, v4, v5, v6, v7)


@njit(fastmath=True, cache=True)
def _first_argmin(bits):
    """First index of the smallest distance, given the int32 view of float32 distances.

    Distances are >= 0 up to rounding: a negative one (sign bit set, a negative int) counts as 0.
    NaN bits are larger than any finite distance's, so a NaN vector gets code 0 like argmin."""
    k = bits.shape[0]
    best = np.int32(2147483647)
    for j in range(k):
        x = bits[j]
        x = x if x > 0 else np.int32(0)
        best = x if x < best else best
    first = np.int32(k)
    for j in range(k):
        x = bits[j]
        x = x if x > 0 else np.int32(0)
        i = np.int32(j) if x == best else np.int32(k)
        first = i if i < first else first
    return first


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _search(x, cbt, cs, out):
    """x (n, dim); cbt (chunks, 8, K), the transposed codebook in 8-dimension chunks (zero-padded);
    cs (K,) the |c|^2 term."""
    n, dim = x.shape
    chunks, _, k = cbt.shape
    for block in prange((n + BLOCK - 1) // BLOCK):
        m = np.empty((chunks, TILE, CHUNK), np.float32)  # -2 x, one buffer set per block of tiles
        xsq = np.empty(TILE, np.float32)
        d = np.empty((TILE, k), np.float32)
        bits = d.view(np.int32)
        for i0 in range(block * BLOCK, min(n, (block + 1) * BLOCK), TILE):
            nq = min(TILE, n - i0)
            m[:] = 0
            xsq[:] = 0
            for q in range(nq):
                for c in range(dim):
                    m[c // CHUNK, q, c % CHUNK] = np.float32(-2) * x[i0 + q, c]
                    xsq[q] += x[i0 + q, c] * x[i0 + q, c]
            base = (xsq[0], xsq[1], xsq[2], xsq[3], cs)
            _distances(cbt[0], base, _rows(m[0]), d, True)
            for chunk in range(1, chunks):
                _distances(cbt[chunk], base, _rows(m[chunk]), d, False)
            for q in range(nq):
                out[i0 + q] = _first_argmin(bits[q])


def nearest_codes(x: np.ndarray, codebook: np.ndarray, cosine: bool = False, threads: int = 0) -> np.ndarray:
    """Exact nearest code: x (n, dim), codebook (K, dim) -> index (n,) int32, the first on ties.

    With cosine, x must be unit vectors (as the quantizer normalises them): the largest x.c wins.
    `threads` (0: numba's default) caps the threads for this call."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    codebook = np.asarray(codebook, dtype=np.float32)
    k, dim = codebook.shape
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"vectors of shape {x.shape} do not match a codebook of dimension {dim}")
    padded = np.zeros((-(-dim // CHUNK) * CHUNK, k), np.float32)
    padded[:dim] = codebook.T
    cbt = padded.reshape(-1, CHUNK, k)
    cs = (codebook.astype(np.float64) ** 2).sum(1)
    if cosine:  # 1 + max|c|^2 - 2 x.c >= 0 for unit x, and orders the codes as -x.c does
        cs[:] = cs.max()
    out = np.empty(len(x), np.int32)
    if len(x):
        previous = numba.get_num_threads()
        if threads:
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            _search(x, cbt, cs.astype(np.float32), out)
        finally:
            numba.set_num_threads(previous)
    return out
