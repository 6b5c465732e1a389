"""Parity of the batched KS test with scipy.stats.ks_2samp, row by row."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.stats._stats_py import _compute_prob_outside_square

from fairseq2_kslottery.ks import KSInputError, ks_2samp_rows, ks_critical_value, ks_pvalue

METHODS = ("auto", "exact", "asymp")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _scipy_rows(a: torch.Tensor, b: torch.Tensor, method: str) -> tuple[np.ndarray, np.ndarray]:
    # float64 holds every fp16/bf16/fp32 value exactly, so scipy sees the same samples (and the same ties).
    an, bn = a.double().cpu().numpy(), b.double().cpu().numpy()
    stats, pvals = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns when it falls back from exact to asymp
        for i in range(an.shape[0]):
            res = scipy.stats.ks_2samp(an[i], bn[i], method=method)
            stats.append(float(res.statistic))
            pvals.append(float(res.pvalue))
    return np.array(stats), np.array(pvals)


def _assert_parity(a: torch.Tensor, b: torch.Tensor, method: str, backend: str, **kwargs: object) -> None:
    res = ks_2samp_rows(a, b, method=method, backend=backend, **kwargs)  # type: ignore[arg-type]
    assert res.statistic.dtype == torch.float64 and res.pvalue.dtype == torch.float64
    assert res.statistic.shape == (a.shape[0],) and res.pvalue.shape == (a.shape[0],)
    want_d, want_p = _scipy_rows(a, b, method)
    got_d, got_p = res.statistic.numpy(), res.pvalue.numpy()
    # Statistic: bitwise equal.
    mismatch = np.nonzero(got_d != want_d)[0]
    assert mismatch.size == 0, f"row {mismatch[0]}: D {got_d[mismatch[0]]!r} != scipy {want_d[mismatch[0]]!r}"
    # p-value: 1e-12 absolute or 1e-9 relative (NaN only where scipy gives NaN: d = 1 in asymp mode).
    both_nan = np.isnan(got_p) & np.isnan(want_p)
    close = (np.abs(got_p - want_p) <= 1e-12) | (np.abs(got_p - want_p) <= 1e-9 * np.abs(want_p)) | both_nan
    bad = np.nonzero(~close)[0]
    assert bad.size == 0, f"row {bad[0]}: p {got_p[bad[0]]!r} != scipy {want_p[bad[0]]!r}"


def _cases(rng: np.random.Generator, rows: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows spanning the behaviours that matter: identical, shifted (tiny p), noisy, tied, zeros of both signs."""
    base = rng.standard_normal((rows, d))
    scale = np.linspace(0.0, 1.5, rows)[:, None]
    other = base + scale * rng.standard_normal((rows, d))
    a = torch.from_numpy(base).to(dtype)
    b = torch.from_numpy(other).to(dtype)
    b[0] = a[0]  # identical rows: D = 0, p = 1
    b[1] = a[1] + 4.0  # far apart: D = 1, tiny p
    a[2], b[2] = torch.round(a[2] * 2), torch.round(b[2])  # heavy ties across and within samples
    a[3], b[3] = torch.zeros(d, dtype=dtype), -torch.zeros(d, dtype=dtype)  # +0.0 vs -0.0 are ties
    a[4] = 1.0  # a constant row against a noisy one
    return a, b


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("d", [1, 2, 3, 5, 13, 64, 577])
def test_ks_2samp_rows_matches_scipy(backend: str, dtype: torch.dtype, d: int) -> None:
    rng = np.random.default_rng(d * 31 + len(str(dtype)))
    a, b = _cases(rng, 24, d, dtype)
    for method in METHODS:
        _assert_parity(a, b, method, backend)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_ks_2samp_rows_matches_scipy_on_bf16_embedding_like_rows(backend: str) -> None:
    # bf16 rows of small-magnitude values tie a lot, as tuned bf16 embeddings do.
    rng = np.random.default_rng(7)
    base = torch.from_numpy(rng.normal(0, 0.02, (64, 1024))).to(torch.bfloat16)
    step = torch.from_numpy(rng.normal(0, 0.0002, (64, 1024))) * torch.linspace(0, 3, 64)[:, None]
    tuned = (base.double() + step).to(torch.bfloat16)
    assert (tuned == base).float().mean() > 0.1  # many coordinates did not move at all
    for method in METHODS:
        _assert_parity(base, tuned, method, backend)


def test_ks_2samp_rows_reproduces_scipys_fallback_from_exact_to_asymp() -> None:
    # For these n, scipy's exact sum for h = 1 leaves [0, 1] by rounding and scipy switches to the asymptotic
    # p-value; rows with D = 1/n exercise exactly that path.
    ns = [n for n in range(5, 40) if not 0 <= _compute_prob_outside_square(n, 1) <= 1]
    assert ns, "expected some n where scipy's exact formula overflows [0, 1]"
    for n in ns[:4]:
        a = torch.arange(n, dtype=torch.float64).repeat(3, 1)
        b = a.clone()
        b[:, -1] = n + 10.0  # moves one point past the maximum: D = 1/n
        b[0] = a[0]
        for backend in ("numba", "torch"):
            _assert_parity(a, b, "exact", backend)
            _assert_parity(a, b, "auto", backend)


def test_ks_2samp_rows_auto_uses_asymp_above_10000() -> None:
    rng = np.random.default_rng(3)
    a = torch.from_numpy(rng.standard_normal((3, 10001))).float()
    b = a + 0.05 * torch.from_numpy(rng.standard_normal((3, 10001))).float()
    _assert_parity(a, b, "auto", "numba")
    _assert_parity(a, b, "exact", "numba")


def test_ks_2samp_rows_tiny_pvalues_match_scipy() -> None:
    rng = np.random.default_rng(11)
    a = torch.from_numpy(rng.standard_normal((8, 300)))
    b = a + torch.linspace(1.0, 6.0, 8)[:, None]
    res = ks_2samp_rows(a, b)
    assert float(res.pvalue.min()) < 1e-100
    _assert_parity(a, b, "auto", "numba")
    _assert_parity(a, b, "asymp", "numba")


def test_ks_2samp_rows_is_independent_of_chunking_and_threads() -> None:
    rng = np.random.default_rng(5)
    a, b = _cases(rng, 50, 97, torch.float32)
    ref = ks_2samp_rows(a, b, num_threads=1)
    for chunk_rows, threads in [(1, 2), (7, 1), (50, 2), (1000, 2)]:
        got = ks_2samp_rows(a, b, chunk_rows=chunk_rows, num_threads=threads)
        assert torch.equal(got.statistic, ref.statistic)
        assert torch.equal(got.pvalue, ref.pvalue)
    torch_res = ks_2samp_rows(a, b, backend="torch", chunk_rows=9)
    assert torch.equal(torch_res.statistic, ref.statistic)
    assert torch.equal(torch_res.pvalue, ref.pvalue)


def test_ks_2samp_rows_reads_non_contiguous_rows() -> None:
    rng = np.random.default_rng(9)
    a = torch.from_numpy(rng.standard_normal((40, 30))).float()
    b = a + 0.3 * torch.from_numpy(rng.standard_normal((40, 30))).float()
    got = ks_2samp_rows(a[::2], b[::2], chunk_rows=4)
    ref = ks_2samp_rows(a[::2].contiguous(), b[::2].contiguous())
    assert torch.equal(got.statistic, ref.statistic)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_ks_2samp_rows_rejects_non_finite_rows(backend: str, bad: float) -> None:
    a = torch.zeros(10, 4)
    b = torch.ones(10, 4)
    b[6, 2] = bad
    with pytest.raises(KSInputError, match=r"^Row 6 of `a` or `b` contains NaN or Inf"):
        ks_2samp_rows(a, b, backend=backend, chunk_rows=3)


def test_ks_2samp_rows_rejects_bad_inputs() -> None:
    a = torch.zeros(4, 3)
    with pytest.raises(KSInputError, match=r"same shape, but have \(4, 3\) and \(4, 2\)"):
        ks_2samp_rows(a, torch.zeros(4, 2))
    with pytest.raises(KSInputError, match=r"2-D \(V, d\) tensor, but has shape \(12,\)"):
        ks_2samp_rows(a.flatten(), a.flatten())
    with pytest.raises(KSInputError, match=r"same dtype, but have float32 and float64"):
        ks_2samp_rows(a, a.double())
    with pytest.raises(KSInputError, match=r"must be float16, bfloat16, float32 or float64, but is int64"):
        ks_2samp_rows(a.long(), a.long())
    with pytest.raises(KSInputError, match=r"`method` must be one of auto, exact, asymp, but is 'fast'"):
        ks_2samp_rows(a, a, method="fast")  # type: ignore[arg-type]


def test_ks_2samp_rows_handles_empty_vocabulary() -> None:
    res = ks_2samp_rows(torch.zeros(0, 8), torch.zeros(0, 8))
    assert res.statistic.shape == (0,) and res.pvalue.shape == (0,)


@pytest.mark.parametrize("method", METHODS)
def test_ks_critical_value_is_the_smallest_significant_statistic(method: str) -> None:
    n = 576
    crit = ks_critical_value(n, 0.05, method)  # type: ignore[arg-type]
    h = round(crit * n)
    assert ks_pvalue(n, h / n, method)[0] <= 0.05  # type: ignore[arg-type]
    assert ks_pvalue(n, (h - 1) / n, method)[0] > 0.05  # type: ignore[arg-type]
    # The notes measured D ~ 0.080 for d = 576 at alpha = 0.05.
    assert 0.07 < crit < 0.09
