"""Time scipy's per-row loop against ks_2samp_rows on the same rows, in one run, and print the ratio.

    python benchmarks/bench_ks.py --rows 2000 --dim 4096 --dtype float32
    python benchmarks/bench_ks.py --rows 32000 --dim 4096 --dtype bfloat16 --scipy-rows 4000

With ``--scipy-rows N`` scipy runs on the first N rows only and its time is scaled to all rows (scipy's cost per
row does not depend on the row). Machines here are noisy: compare the ratio, not the absolute times, and repeat.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import scipy.stats
import torch

from fairseq2_kslottery.ks import ks_2samp_rows


def make_pair(
    rows: int, dim: int, dtype: torch.dtype, seed: int, moved_fraction: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding-like base matrix and a tuned copy in which ``moved_fraction`` of the rows moved."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, dim, generator=gen) * 0.02
    tuned = base.clone()
    moved = torch.randperm(rows, generator=gen)[: max(1, round(rows * moved_fraction))]
    tuned[moved] += torch.randn(moved.numel(), dim, generator=gen) * 0.002
    return base.to(dtype), tuned.to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    parser.add_argument("--scipy-rows", type=int, default=None, help="rows timed with scipy (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions of ks_2samp_rows (best is kept)")
    parser.add_argument("--torch-backend", action="store_true", help="also time the torch backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--moved-fraction",
        type=float,
        default=1.0,
        help="share of rows that differ between the two matrices (default 1.0, the hard case: every row is "
        "sorted; after embedding-only tuning most rows are untouched and skipped)",
    )
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    a, b = make_pair(args.rows, args.dim, dtype, args.seed, args.moved_fraction)
    scipy_rows = min(args.rows, args.scipy_rows or args.rows)

    ks_2samp_rows(a[:2], b[:2])  # compile/load the kernel outside the timing

    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        res = ks_2samp_rows(a, b)
        best = min(best, time.perf_counter() - t0)

    torch_time = None
    if args.torch_backend:
        t0 = time.perf_counter()
        ks_2samp_rows(a, b, backend="torch")
        torch_time = time.perf_counter() - t0

    an = a[:scipy_rows].double().numpy()
    bn = b[:scipy_rows].double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        ref = [scipy.stats.ks_2samp(an[i], bn[i]).statistic for i in range(scipy_rows)]
        scipy_time = (time.perf_counter() - t0) * args.rows / scipy_rows

    assert np.array_equal(np.asarray(ref), res.statistic[:scipy_rows].numpy()), "statistics differ from scipy"

    print(
        f"rows={args.rows} dim={args.dim} dtype={args.dtype} moved={args.moved_fraction:g} "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"scipy loop     : {scipy_time:8.3f} s  ({scipy_time / args.rows * 1e3:.3f} ms/row"
        f"{'' if scipy_rows == args.rows else f', timed on {scipy_rows} rows'})"
    )
    print(f"ks_2samp_rows  : {best:8.3f} s  (best of {args.repeat})")
    if torch_time is not None:
        print(f"torch backend  : {torch_time:8.3f} s  ({scipy_time / torch_time:.1f}x scipy)")
    print(f"speed-up       : {scipy_time / best:.1f}x")


if __name__ == "__main__":
    main()
