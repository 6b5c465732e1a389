"""Batched two-sample Kolmogorov–Smirnov test over the rows of two matrices.

KS-Lottery treats the ``d`` coordinates of one embedding row as a sample and asks, for every vocabulary row, whether
the row's value distribution changed between the base and the tuned model. :func:`ks_2samp_rows` answers that for
all rows at once and agrees row by row with ``scipy.stats.ks_2samp`` (two-sided), including scipy's handling of
ties, identical rows and its switch from the exact to the asymptotic p-value.

Pure tensor code: no fairseq2 import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "KSInputError",
    "KSResult",
    "ks_2samp_rows",
    "ks_pvalue",
    "ks_critical_value",
    "KS_METHODS",
]

KSMethod = Literal["auto", "exact", "asymp"]
KS_METHODS: Final = ("auto", "exact", "asymp")

# scipy.stats.ks_2samp uses the exact distribution in "auto" mode up to this sample size.
_MAX_AUTO_N: Final = 10000

# Working-set budget per chunk of rows (bytes); the default chunk size is derived from it.
_CHUNK_BYTES: Final = 64 * 1024 * 1024

_FLOAT_BITS: Final = {
    # dtype: (unsigned view, sign mask, magnitude mask, exponent mask, key bits)
    torch.float16: (np.uint16, 0x8000, 0x7FFF, 0x7C00, 16),
    torch.bfloat16: (np.uint16, 0x8000, 0x7FFF, 0x7F80, 16),
    torch.float32: (np.uint32, 0x80000000, 0x7FFFFFFF, 0x7F800000, 32),
    torch.float64: (np.uint64, 0x8000000000000000, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000, 64),
}

_SIGNED_VIEW: Final = {16: torch.int16, 32: torch.int32, 64: torch.int64}


class KSInputError(ValueError):
    """The inputs of :func:`ks_2samp_rows` cannot be tested (shape, dtype, NaN/Inf, method)."""


@dataclass(frozen=True)
class KSResult:
    """Per-row two-sample KS results.

    ``statistic`` and ``pvalue`` are float64 CPU tensors of shape (V,); ``n`` is the sample size per row (``d``) and
    ``method`` the method that was asked for.
    """

    statistic: Tensor
    pvalue: Tensor
    n: int
    method: str


def ks_2samp_rows(
    a: Tensor,
    b: Tensor,
    *,
    method: KSMethod = "auto",
    chunk_rows: int | None = None,
    backend: Literal["auto", "numba", "torch"] = "auto",
    num_threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KSResult:
    """Two-sided two-sample KS test between ``a[i]`` and ``b[i]`` for every row ``i``.

    :param a: (V, d) float tensor (float16, bfloat16, float32 or float64), CPU or CUDA.
    :param b: tensor of the same shape and dtype as ``a``.
    :param method: ``"auto"``, ``"exact"`` or ``"asymp"``, with the meaning of ``scipy.stats.ks_2samp``.
    :param chunk_rows: rows processed at a time; by default as many as fit a 64 MiB working set.
    :param backend: ``"numba"`` (compiled CPU kernel, the default on CPU), ``"torch"`` (vectorised torch, the
        default on CUDA; also usable on CPU). Both give the same results.
    :param num_threads: CPU threads for the numba kernel; default ``torch.get_num_threads()``.
    :param progress: called as ``progress(rows_done, rows_total)`` after each chunk.

    :returns: a :class:`KSResult` whose ``statistic`` and ``pvalue`` equal, row by row,
        ``scipy.stats.ks_2samp(a[i], b[i], method=method)``: statistic bitwise, p-value to within float rounding
        (the same formulas in the same order; scipy's own ``kstwo`` is used for asymptotic p-values). Rows are
        independent, so results do not depend on ``chunk_rows`` or the thread count.

    Memory: besides the inputs, at most about 64 MiB (or ``chunk_rows × d × 32`` bytes when given) for the working
    set of one chunk, plus O(V) for the results. A 128256×4096 pair is handled in chunks of that size; nothing of
    size V×d is ever copied (bf16/fp16/fp32/fp64 rows are read through integer views of the input memory).

    :raises KSInputError: if the shapes differ or are not 2-D with ``d >= 1``, the dtypes differ or are not
        floating point, ``method`` is unknown, or a row holds NaN or ±Inf (the message names the first such row).
    """
    n = _check_inputs(a, b, method)
    rows = a.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_BYTES // (32 * n))
    elif chunk_rows < 1:
        raise KSInputError(f"`chunk_rows` must be at least 1, but is {chunk_rows}.")

    if backend == "auto":
        backend = "torch" if a.device.type != "cpu" or not _numba_available() else "numba"
    if backend not in ("numba", "torch"):
        raise KSInputError(f"`backend` must be 'auto', 'numba' or 'torch', but is {backend!r}.")

    hi = np.empty(rows, np.float64)
    lo = np.empty(rows, np.float64)
    table = np.arange(n + 1, dtype=np.int64) / n  # table[k] == k / n, as scipy computes cdf values

    if backend == "numba":
        if a.device.type != "cpu":
            raise KSInputError("The 'numba' backend runs on CPU tensors only; use backend='torch' for CUDA.")
        with _numba_threads(num_threads):
            for start in range(0, rows, chunk_rows):
                stop = min(rows, start + chunk_rows)
                _numba_chunk(a[start:stop], b[start:stop], table, hi[start:stop], lo[start:stop], start)
                if progress is not None:
                    progress(stop, rows)
    else:
        table_t = torch.from_numpy(table).to(a.device)
        for start in range(0, rows, chunk_rows):
            stop = min(rows, start + chunk_rows)
            _torch_chunk(a[start:stop], b[start:stop], table_t, hi[start:stop], lo[start:stop], start)
            if progress is not None:
                progress(stop, rows)

    statistic, pvalue = _finish(hi, lo, n, method)
    return KSResult(torch.from_numpy(statistic), torch.from_numpy(pvalue), n, method)


def ks_pvalue(n: int, statistic: float | np.ndarray, method: KSMethod = "auto") -> np.ndarray:
    """Two-sided p-values of KS statistics for two samples of size ``n`` each, as ``scipy.stats.ks_2samp``.

    ``statistic`` values should be multiples of ``1/n`` (what the test produces); for the exact method they are
    rounded to the nearest one, as scipy does.
    """
    d = np.atleast_1d(np.asarray(statistic, dtype=np.float64))
    return _finish(d, np.zeros_like(d), n, method)[1]


def ks_critical_value(n: int, alpha: float, method: KSMethod = "auto") -> float:
    """The smallest statistic ``h/n`` whose two-sided p-value (samples of size ``n``) is at most ``alpha``.

    Returns ``inf`` when no statistic reaches ``alpha`` (possible for tiny ``n``). The p-value is non-increasing
    in the statistic, so a binary search over ``h`` finds the critical value.
    """
    if not 0.0 < alpha < 1.0:
        raise KSInputError(f"`alpha` must be in (0, 1), but is {alpha}.")
    hs = np.arange(n + 1, dtype=np.float64) / n
    lo_h, hi_h = 1, n
    if ks_pvalue(n, hs[n], method)[0] > alpha:
        return math.inf
    while lo_h < hi_h:
        mid = (lo_h + hi_h) // 2
        if ks_pvalue(n, hs[mid], method)[0] <= alpha:
            hi_h = mid
        else:
            lo_h = mid + 1
    return float(hs[lo_h])


# --- internals ------------------------------------------------------------------------------------------------


def _check_inputs(a: Tensor, b: Tensor, method: str) -> int:
    if method not in KS_METHODS:
        raise KSInputError(f"`method` must be one of {', '.join(KS_METHODS)}, but is {method!r}.")
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor):
            raise KSInputError(f"`{name}` must be a torch.Tensor, but is {type(t).__name__}.")
        if t.dim() != 2:
            raise KSInputError(f"`{name}` must be a 2-D (V, d) tensor, but has shape {tuple(t.shape)}.")
        if t.dtype not in _FLOAT_BITS:
            raise KSInputError(
                f"`{name}` must be float16, bfloat16, float32 or float64, but is {str(t.dtype).removeprefix('torch.')}."
            )
    if a.shape != b.shape:
        raise KSInputError(f"`a` and `b` must have the same shape, but have {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.dtype != b.dtype:
        raise KSInputError(
            f"`a` and `b` must have the same dtype, but have {str(a.dtype).removeprefix('torch.')} and "
            f"{str(b.dtype).removeprefix('torch.')}."
        )
    if a.device != b.device:
        raise KSInputError(f"`a` and `b` must be on the same device, but are on {a.device} and {b.device}.")
    if a.shape[1] < 1:
        raise KSInputError("`a` and `b` must have at least one column (d >= 1).")
    return int(a.shape[1])


def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _numba_threads(num_threads: int | None) -> Iterator[None]:
    import numba

    wanted = num_threads if num_threads is not None else torch.get_num_threads()
    wanted = max(1, min(int(wanted), numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()
    numba.set_num_threads(wanted)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _raise_non_finite(bad_row: int) -> None:
    raise KSInputError(f"Row {bad_row} of `a` or `b` contains NaN or Inf; the KS test needs finite values.")


def _numba_chunk(a: Tensor, b: Tensor, table: np.ndarray, hi: np.ndarray, lo: np.ndarray, offset: int) -> None:
    from fairseq2_kslottery._ks_kernels import rows_cdf_extremes

    view, sign, mag, expo, nbits = _FLOAT_BITS[a.dtype]
    signed = _SIGNED_VIEW[nbits]
    # Integer views share the input memory: no copy unless a chunk is not contiguous.
    bits_a = a.contiguous().view(signed).numpy().view(view)
    bits_b = b.contiguous().view(signed).numpy().view(view)
    finite = np.empty(a.shape[0], np.bool_)
    rows_cdf_extremes(bits_a, bits_b, view(sign), view(mag), view(expo), nbits, table, hi, lo, finite)
    if not finite.all():
        _raise_non_finite(offset + int(np.argmin(finite)))


def _torch_chunk(a: Tensor, b: Tensor, table: Tensor, hi: np.ndarray, lo: np.ndarray, offset: int) -> None:
    finite = torch.isfinite(a).all(dim=1) & torch.isfinite(b).all(dim=1)
    if not bool(finite.all()):
        _raise_non_finite(offset + int(torch.argmin(finite.to(torch.uint8))))
    n = a.shape[1]
    # fp16/bf16 convert to float32 exactly; adding 0 folds -0.0 onto +0.0 (they compare equal anyway).
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    pooled = torch.cat([a.to(work), b.to(work)], dim=1) + 0.0
    values, order = torch.sort(pooled, dim=1, stable=True)
    from_a = (order < n).to(torch.int64)
    count_a = torch.cumsum(from_a, dim=1)
    positions = torch.arange(1, 2 * n + 1, device=a.device, dtype=torch.int64)
    count_b = positions - count_a
    diff = table[count_a] - table[count_b]
    # Only the last element of each tie group is an evaluation point of the empirical CDFs.
    group_end = torch.ones_like(values, dtype=torch.bool)
    group_end[:, :-1] = values[:, 1:] != values[:, :-1]
    hi[:] = torch.where(group_end, diff, -math.inf).amax(dim=1).cpu().numpy()
    lo[:] = torch.where(group_end, diff, math.inf).amin(dim=1).cpu().numpy()


def _finish(hi: np.ndarray, lo: np.ndarray, n: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """scipy's decision logic, vectorised: statistic from the CDF extremes, then the p-value per method."""
    min_s = np.clip(-lo, 0, 1)
    d = np.where(min_s > hi, min_s, hi)
    if method == "auto":
        method = "exact" if n <= _MAX_AUTO_N else "asymp"
    pvalue = np.empty_like(d)
    use_asymp = np.zeros(d.shape, dtype=np.bool_)
    if method == "exact":
        h = np.round(d * n).astype(np.int64)
        d = h * 1.0 / n
        pvalue[h == 0] = 1.0
        positive = h > 0
        if positive.any():
            uniq, inverse = np.unique(h[positive], return_inverse=True)
            from fairseq2_kslottery._ks_kernels import exact_two_sided_pvalues

            probs = exact_two_sided_pvalues(n, uniq)[inverse]
            pvalue[positive] = probs
            # scipy falls back to the asymptotic p-value (with the rounded statistic) when the exact sum leaves [0, 1].
            bad = np.zeros(d.shape, dtype=np.bool_)
            bad[positive] = ~((probs >= 0) & (probs <= 1))
            use_asymp |= bad
    else:
        use_asymp[:] = True
    if use_asymp.any():
        from scipy.stats import kstwo

        en = float(n) * float(n) / (float(n) + float(n))
        uniq_d, inverse = np.unique(d[use_asymp], return_inverse=True)
        pvalue[use_asymp] = np.asarray(kstwo.sf(uniq_d, np.round(en)), dtype=np.float64)[inverse]
    return d.astype(np.float64), np.clip(pvalue, 0, 1)
