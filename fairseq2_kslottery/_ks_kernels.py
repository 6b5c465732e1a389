"""Compiled CPU kernels behind :func:`fairseq2_kslottery.ks.ks_2samp_rows`.

Why a kernel at all: a Python loop over ``scipy.stats.ks_2samp`` costs about a millisecond per 4096-value row, and a
vectorised sort + searchsorted in torch is barely faster, because the work after the sort (running counts, tie
masking, max) is a chain of memory-bound passes. Here each row is handled start to finish while it sits in cache:

1. Values are mapped to order-preserving unsigned integer keys (IEEE sign-magnitude -> two's-complement order;
   ``-0.0`` is folded onto ``+0.0`` because the two compare equal). Non-finite values are flagged on the way.
2. Each sample is sorted with an LSD radix sort (11-bit digits), which beats numpy's comparison sort here.
3. One branch-light merge of the two sorted samples evaluates both empirical CDFs at every distinct pooled value
   (the end of each tie group), exactly where ``scipy.stats.ks_2samp`` evaluates them, and keeps the largest and
   smallest ``cdf1 - cdf2`` as float64 computed the way scipy computes them (``i/n - j/n``), so the statistic is
   bitwise equal to scipy's in every mode.

Rows whose bits are identical in both matrices (the untouched rows of an embedding-only fine-tune) skip steps 2-3:
their statistic is 0. Rows are independent, so results do not depend on the number of threads.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numba import njit, prange

_DIGIT_BITS: Final = 11


@njit(inline="always", nogil=True)
def _radix_sort(src: np.ndarray, dst: np.ndarray, nbits: int, cnt: np.ndarray) -> np.ndarray:
    """Sort ``src`` ascending (LSD radix); returns whichever of ``src``/``dst`` holds the result."""
    n = src.shape[0]
    key = src.dtype.type
    nbuckets = 1 << _DIGIT_BITS
    mask = key(nbuckets - 1)
    npasses = (nbits + _DIGIT_BITS - 1) // _DIGIT_BITS
    for p in range(npasses):
        # Shift and mask in the key's own unsigned type: mixing uint64 with int64 would go through float64.
        shift = key(_DIGIT_BITS * p)
        cnt[:] = 0
        for t in range(n):
            cnt[(src[t] >> shift) & mask] += 1
        # A pass in which every key has the same digit changes nothing.
        if cnt[(src[0] >> shift) & mask] == n:
            continue
        acc = 0
        for c in range(nbuckets):
            v = cnt[c]
            cnt[c] = acc
            acc += v
        for t in range(n):
            k = src[t]
            dg = (k >> shift) & mask
            dst[cnt[dg]] = k
            cnt[dg] += 1
        src, dst = dst, src
    return src


@njit(inline="always", nogil=True)
def _same_bits(x: np.ndarray, y: np.ndarray) -> bool:
    for t in range(x.shape[0]):
        if x[t] != y[t]:
            return False
    return True


@njit(inline="always", nogil=True)
def _all_finite(row: np.ndarray, expo) -> bool:
    for t in range(row.shape[0]):
        if (row[t] & expo) == expo:
            return False
    return True


@njit(inline="always", nogil=True)
def _to_keys(row: np.ndarray, out: np.ndarray, sign, mag, expo) -> bool:
    """Write order-preserving keys of the float bit patterns in ``row`` to ``out``; False if any is NaN/Inf."""
    finite = True
    zero = row.dtype.type(0)
    for t in range(row.shape[0]):
        u = row[t]
        if (u & expo) == expo:
            finite = False
        if (u & mag) == zero:
            u = zero
        out[t] = (~u) if (u & sign) != zero else (u | sign)
    return finite


@njit(parallel=True, nogil=True, cache=True)
def rows_cdf_extremes(
    bits_a: np.ndarray,
    bits_b: np.ndarray,
    sign,
    mag,
    expo,
    nbits: int,
    table: np.ndarray,
    out_max: np.ndarray,
    out_min: np.ndarray,
    out_finite: np.ndarray,
) -> None:
    """For each row r: max and min over the pooled values x of ``#a<=x / n - #b<=x / n``.

    ``bits_a``/``bits_b``: (R, n) unsigned views of the float rows; ``sign``/``mag``/``expo``: the bit masks of the
    float format (same dtype as the views); ``table[k] == k / n`` as float64. Rows with a NaN/Inf get
    ``out_finite[r] = False`` (their extremes are meaningless).
    """
    rows, n = bits_a.shape
    top = bits_a.dtype.type(-1)  # all ones: larger than the key of any finite value
    for r in prange(rows):
        if _same_bits(bits_a[r], bits_b[r]):
            # Untouched rows (most of the vocabulary after embedding tuning): D = 0 without sorting.
            out_finite[r] = _all_finite(bits_a[r], expo)
            out_max[r] = 0.0
            out_min[r] = 0.0
            continue
        ka = np.empty(n + 1, bits_a.dtype)
        kb = np.empty(n + 1, bits_a.dtype)
        buf = np.empty(n, bits_a.dtype)
        cnt = np.empty(1 << _DIGIT_BITS, np.int64)
        fin_a = _to_keys(bits_a[r], ka, sign, mag, expo)
        fin_b = _to_keys(bits_b[r], kb, sign, mag, expo)
        out_finite[r] = fin_a and fin_b
        res = _radix_sort(ka[:n], buf, nbits, cnt)
        if res.ctypes.data != ka.ctypes.data:
            ka[:n] = res
        res = _radix_sort(kb[:n], buf, nbits, cnt)
        if res.ctypes.data != kb.ctypes.data:
            kb[:n] = res
        ka[n] = top
        kb[n] = top
        i = 0
        j = 0
        hi = -np.inf
        lo = np.inf
        for _ in range(2 * n):
            xa = ka[i]
            xb = kb[j]
            take_a = xa <= xb
            x = xa if take_a else xb
            i += take_a
            j += 1 - take_a
            # Only the last element of a tie group is an evaluation point.
            group_end = min(ka[i], kb[j]) != x
            diff = table[i] - table[j]
            hi = max(hi, diff if group_end else -np.inf)
            lo = min(lo, diff if group_end else np.inf)
        out_max[r] = hi
        out_min[r] = lo


@njit(nogil=True, cache=True)
def _prob_outside_square(n: int, h: int) -> float:
    # The same arithmetic, in the same order, as scipy.stats._stats_py._compute_prob_outside_square:
    # Pr(D_{n,n} >= h/n) by a Horner-like alternating sum, so the p-value matches scipy to the last bit.
    p = 0.0
    k = n // h
    while k >= 0:
        p1 = 1.0
        for j in range(h):
            p1 = float(n - k * h - j) * p1 / float(n + k * h + j + 1)
        p = p1 * (1.0 - p)
        k -= 1
    return 2 * p


@njit(parallel=True, nogil=True, cache=True)
def exact_two_sided_pvalues(n: int, hs: np.ndarray) -> np.ndarray:
    """Exact two-sided p-values ``Pr(D_{n,n} >= h/n)`` for each h > 0 in ``hs`` (scipy's n1 == n2 formula)."""
    out = np.empty(hs.shape[0], np.float64)
    for t in prange(hs.shape[0]):
        out[t] = _prob_outside_square(n, hs[t])
    return out
