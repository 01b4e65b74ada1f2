"""Tests of the preprocessing kernels against scanpy and plain-numpy references."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
from scipy import stats

from cellfoundry.discretize import (
    TIE_BREAKS,
    _quantile_edges,
    qc_metrics,
    qc_metrics_csr,
    quantile_bins,
    quantile_bins_csr,
    quantile_bins_reference,
    rank_order,
    rank_order_matrix,
    rank_order_reference,
    tie_uniforms,
)
from cellfoundry.gene_stats import RESOLUTION
from cellfoundry.seeds import derive_seed

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
MOUSE_E18 = SHARED_DATA / "mouse_e18_brain_10k_cells_1000genes.h5ad"
PBMC1K = SHARED_DATA / "human_pbmc1k_10x_cellranger6.h5"


def random_counts(
    n_cells: int, n_genes: int, *, density: float, mean: float, seed: int
) -> sp.csr_matrix:
    """Negative-binomial-like counts (many ties among small values), a few empty cells."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n_cells, n_genes)) < density * rng.uniform(0.2, 1.8, size=(n_cells, 1))
    dispersion = 0.7
    counts = 1 + rng.negative_binomial(
        dispersion, dispersion / (dispersion + mean - 1), size=(n_cells, n_genes)
    )
    dense = np.where(mask, counts, 0)
    dense[rng.choice(n_cells, size=max(1, n_cells // 20), replace=False)] = 0
    return sp.csr_matrix(dense.astype(np.int32))


def awkward_rows(n_genes: int, seed: int) -> sp.csr_matrix:
    """Edge cases of binning: 1..40 non-zeros, all-equal rows, huge and spread-out values."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in range(41):
        row = np.zeros(n_genes, dtype=np.int64)
        row[rng.choice(n_genes, size=m, replace=False)] = rng.integers(1, 6, size=m)
        rows.append(row)
    for value in (1, 3, 70_000):  # all non-zeros equal
        row = np.zeros(n_genes, dtype=np.int64)
        row[rng.choice(n_genes, size=25, replace=False)] = value
        rows.append(row)
    for high in (100, 65_535, 70_000, 10**9):  # beyond a small histogram: the sorting path
        row = np.zeros(n_genes, dtype=np.int64)
        row[rng.choice(n_genes, size=60, replace=False)] = rng.integers(1, high + 1, size=60)
        rows.append(row)
    single_large = np.zeros(n_genes, dtype=np.int64)
    single_large[7] = 123_456
    rows.append(single_large)
    return sp.csr_matrix(np.array(rows))


@pytest.fixture(scope="module")
def counts() -> sp.csr_matrix:
    return random_counts(300, 500, density=0.15, mean=4.0, seed=0)


@pytest.fixture(scope="module")
def mouse_e18() -> ad.AnnData:
    if not MOUSE_E18.exists():
        pytest.skip(f"{MOUSE_E18} is absent")
    return ad.read_h5ad(MOUSE_E18)


# --------------------------------------------------------------------------------------------
# QC metrics
# --------------------------------------------------------------------------------------------


def assert_qc_matches_scanpy(X: sp.csr_matrix, mito_mask: np.ndarray) -> None:
    adata = ad.AnnData(X.copy())
    adata.var["mt"] = mito_mask
    obs, _ = sc.pp.calculate_qc_metrics(
        adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=False
    )
    ours = qc_metrics(X, mito_mask)
    np.testing.assert_allclose(ours.total_counts, obs["total_counts"].to_numpy(), rtol=1e-12)
    np.testing.assert_array_equal(ours.n_genes_by_counts, obs["n_genes_by_counts"].to_numpy())
    expressed = ours.total_counts > 0
    np.testing.assert_allclose(
        ours.mito_fraction[expressed],
        obs["pct_counts_mt"].to_numpy()[expressed] / 100,
        rtol=1e-12,
    )
    # scanpy gives NaN for empty cells; ours defines the fraction as 0 there.
    np.testing.assert_array_equal(ours.mito_fraction[~expressed], 0.0)


def test_qc_metrics_match_scanpy(counts: sp.csr_matrix) -> None:
    assert (counts.sum(axis=1) == 0).any()  # the empty-cell convention is exercised
    mito_mask = np.zeros(counts.shape[1], dtype=bool)
    mito_mask[[3, 50, 51, 400]] = True
    assert_qc_matches_scanpy(counts, mito_mask)


def test_qc_metrics_match_scanpy_on_mouse_e18(mouse_e18: ad.AnnData) -> None:
    # The file's first 1,000 genes hold no mitochondrial gene; a fixed gene set stands in.
    mito_mask = np.zeros(mouse_e18.n_vars, dtype=bool)
    mito_mask[np.random.default_rng(1).choice(mouse_e18.n_vars, size=30, replace=False)] = True
    assert_qc_matches_scanpy(sp.csr_matrix(mouse_e18.X), mito_mask)


def test_qc_metrics_ignore_stored_zeros_and_accept_float_data(counts: sp.csr_matrix) -> None:
    mito_mask = np.arange(counts.shape[1]) % 7 == 0
    expected = qc_metrics(counts, mito_mask)
    with_zeros = counts.astype(np.float32).tocoo()
    extra_rows = np.arange(counts.shape[0])
    extra_cols = (extra_rows * 13) % counts.shape[1]
    keep = np.asarray(counts[extra_rows, extra_cols]).ravel() == 0
    X = sp.csr_matrix(
        (
            np.concatenate([with_zeros.data, np.zeros(keep.sum(), np.float32)]),
            (
                np.concatenate([with_zeros.row, extra_rows[keep]]),
                np.concatenate([with_zeros.col, extra_cols[keep]]),
            ),
        ),
        shape=counts.shape,
    )
    assert X.nnz > counts.nnz  # the stored zeros survived construction
    got = qc_metrics(X, mito_mask)
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_qc_metrics_parallel_equals_serial(counts: sp.csr_matrix) -> None:
    mito_mask = np.arange(counts.shape[1]) < 10
    serial = qc_metrics(counts, mito_mask)
    parallel = qc_metrics(counts, mito_mask, parallel=True)
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


def test_qc_metrics_reject_out_of_range_genes(counts: sp.csr_matrix) -> None:
    with pytest.raises(ValueError, match="outside"):
        qc_metrics_csr(counts.indptr, counts.indices, counts.data, np.zeros(100, dtype=bool))


# --------------------------------------------------------------------------------------------
# Quantile binning
# --------------------------------------------------------------------------------------------

N_BINS = [2, 3, 4, 11, 51, 256]
TIE_SEED = 20240611  # any seed: the random rule must equal the reference with its uniforms


def bins_and_reference(
    X: sp.csr_matrix, n_bins: int, tie_break: str, **kwargs: object
) -> tuple[np.ndarray, np.ndarray]:
    """Our kernel's bins and the numpy transcription of scGPT's, given the same uniforms."""
    if tie_break == "highest":
        return (
            quantile_bins(X, n_bins, tie_break="highest", **kwargs),
            quantile_bins_reference(X, n_bins),
        )
    return (
        quantile_bins(X, n_bins, seed=TIE_SEED, **kwargs),
        quantile_bins_reference(X, n_bins, tie_uniforms(X.indptr, TIE_SEED)),
    )


def tie_ranges(X: sp.csr_matrix, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per stored non-zero: (edges < x, edges <= x) of its cell's np.quantile edges."""
    levels = np.linspace(0, 1, n_bins - 1)
    below = np.zeros(X.nnz, dtype=np.int64)
    at_or_below = np.zeros(X.nnz, dtype=np.int64)
    for cell in range(X.shape[0]):
        start, end = X.indptr[cell], X.indptr[cell + 1]
        values = X.data[start:end].astype(np.float64)
        if values.size:
            edges = np.quantile(values, levels)
            below[start:end] = np.digitize(values, edges, right=True)
            at_or_below[start:end] = np.digitize(values, edges)
    return below, at_or_below


@pytest.mark.parametrize("tie_break", TIE_BREAKS)
@pytest.mark.parametrize("n_bins", N_BINS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantile_bins_equal_reference_on_random_counts(
    n_bins: int, seed: int, tie_break: str
) -> None:
    X = random_counts(200, 400, density=0.3, mean=3.0 + 20 * seed, seed=seed)
    got, want = bins_and_reference(X, n_bins, tie_break)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("tie_break", TIE_BREAKS)
@pytest.mark.parametrize("n_bins", N_BINS)
def test_quantile_bins_equal_reference_on_edge_cases(n_bins: int, tie_break: str) -> None:
    X = awkward_rows(300, seed=n_bins)
    got, want = bins_and_reference(X, n_bins, tie_break)
    np.testing.assert_array_equal(got, want)
    # Every non-zero lands among its tied bins: (edges < x) < bin <= (edges <= x) where x
    # equals some edges, bin = (edges <= x) where it equals none.
    below, at_or_below = tie_ranges(X, n_bins)
    assert np.all(got >= 1) and np.all(got <= n_bins - 1)
    tied = below < at_or_below
    np.testing.assert_array_equal(got[~tied], at_or_below[~tied])
    if tie_break == "highest":
        np.testing.assert_array_equal(got, at_or_below)
    else:
        assert np.all((got[tied] > below[tied]) & (got[tied] <= at_or_below[tied]))
        assert np.any(got[tied] < at_or_below[tied]) or n_bins == 2  # broken below the top
    for cell in range(X.shape[0]):
        start, end = X.indptr[cell], X.indptr[cell + 1]
        if end > start:  # the cell's largest value reaches the top bin in its tie
            assert at_or_below[start:end][np.argmax(X.data[start:end])] == n_bins - 1


def test_quantile_edges_are_bit_identical_to_numpy() -> None:
    # Bins rarely depend on the last bit of an edge (an edge only matters where it meets one
    # of the row's own values), so check the edges themselves, from both order-statistic paths.
    rng = np.random.default_rng(0)
    n_differ = 0
    for n_bins in (5, 11, 51, 256):
        levels = np.linspace(0, 1, n_bins - 1)
        for trial in range(200):
            m = int(rng.integers(1, 3000))
            if trial % 2:
                mean = rng.uniform(1, 300)
                values = 1.0 + rng.negative_binomial(0.5, 0.5 / (0.5 + mean), size=m)
            else:  # wide gaps between order statistics make the rounding visible
                values = rng.integers(1, 100_000, size=m).astype(np.float64)
            want = np.quantile(values, levels)
            sorted_values = np.sort(values)
            hist = np.bincount(values.astype(np.int64)).astype(np.int32)
            cursors = np.zeros((2, 2), dtype=np.int64)
            for use_hist in (True, False):
                got = np.empty(levels.size)
                _quantile_edges(
                    levels, m, sorted_values[-1], use_hist, hist, sorted_values, cursors, got
                )
                np.testing.assert_array_equal(got, want)
            # The naive interpolation a + (b - a) * t, which numpy avoids for t >= 0.5.
            n_differ += not np.array_equal(naive_quantile(sorted_values, levels), want)
    assert n_differ > 0  # the cases tell the two formulas apart


def naive_quantile(sorted_values: np.ndarray, levels: np.ndarray) -> np.ndarray:
    virtual = (sorted_values.size - 1) * levels
    below = np.minimum(np.floor(virtual).astype(np.int64), sorted_values.size - 1)
    above = np.minimum(below + 1, sorted_values.size - 1)
    a, b = sorted_values[below], sorted_values[above]
    return a + (b - a) * (virtual - np.floor(virtual))


def test_quantile_bins_random_rule_is_scgpts_digitize_on_a_hand_made_row() -> None:
    # Non-zeros 1,1,1,1,2,5 and 8 bins: edges at levels 0, 1/6, ..., 1 (virtual indices
    # 0, 5/6, 5/3, 5/2, 10/3, 25/6, 5) are 1, 1, 1, 1, 1 + 1/3, 2 + 1/2, 5; a 1 ties with
    # four edges (bins 1..4), 2 lies above five, 5 equals only the last.
    X = sp.csr_matrix(np.array([[1, 1, 0, 1, 1, 2, 5]], dtype=np.int32))
    edges = np.quantile(np.array([1.0, 1, 1, 1, 2, 5]), np.linspace(0, 1, 7))
    np.testing.assert_allclose(edges, [1, 1, 1, 1, 4 / 3, 2.5, 5], rtol=1e-15)
    u = tie_uniforms(X.indptr, 7)
    got = quantile_bins(X, 8, seed=7)
    # scGPT: ceil(u * (right - left) + left) with left = 4, right = 0 for the 1s.
    np.testing.assert_array_equal(got[:4], np.ceil(u[:4] * (0 - 4) + 4).astype(np.uint8))
    np.testing.assert_array_equal(got[4:], [5, 7])  # no tie: 2 -> 5 edges <= 2, 5 -> all 7
    np.testing.assert_array_equal(quantile_bins(X, 8, tie_break="highest"), [4, 4, 4, 4, 5, 7])


@pytest.mark.parametrize("tie_break", TIE_BREAKS)
def test_quantile_bins_of_non_integer_values_equal_reference(tie_break: str) -> None:
    rng = np.random.default_rng(5)
    X = random_counts(100, 300, density=0.3, mean=5.0, seed=5).astype(np.float64)
    X.data[rng.random(X.nnz) < 0.3] += 0.5
    got, want = bins_and_reference(X, 51, tie_break)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("tie_break", TIE_BREAKS)
def test_quantile_bins_give_zero_to_stored_zeros(tie_break: str) -> None:
    X = random_counts(50, 100, density=0.3, mean=3.0, seed=3)
    zeroed = X.copy()
    zeroed.data[::5] = 0  # stored zeros are not values of the cell
    got, want = bins_and_reference(zeroed, 11, tie_break)
    np.testing.assert_array_equal(got[::5], 0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("tie_break", TIE_BREAKS)
def test_quantile_bins_parallel_equals_serial(counts: sp.csr_matrix, tie_break: str) -> None:
    np.testing.assert_array_equal(
        quantile_bins(counts, 51, seed=3, tie_break=tie_break, parallel=True),
        quantile_bins(counts, 51, seed=3, tie_break=tie_break),
    )


@pytest.mark.parametrize("block", [1, 7, 64])
def test_random_bins_are_independent_of_the_block_size(counts: sp.csr_matrix, block: int) -> None:
    whole = quantile_bins(counts, 51, seed=11)
    parts = [
        quantile_bins(counts[lo : lo + block], 51, seed=11, cell_offset=lo)
        for lo in range(0, counts.shape[0], block)
    ]
    assert np.concatenate(parts).tobytes() == whole.tobytes()
    # Parallel chunks of a block with an offset too.
    lo = 37
    np.testing.assert_array_equal(
        quantile_bins(counts[lo:], 51, seed=11, cell_offset=lo, parallel=True),
        whole[counts.indptr[lo] :],
    )


def test_random_bins_depend_on_seed_and_cell_index(counts: sp.csr_matrix) -> None:
    base = quantile_bins(counts, 51, seed=11)
    np.testing.assert_array_equal(base, quantile_bins(counts, 51, seed=11))
    assert np.mean(base != quantile_bins(counts, 51, seed=12)) > 0.2
    # The same cells binned as if they started further down the file draw other numbers.
    assert np.mean(base != quantile_bins(counts, 51, seed=11, cell_offset=1)) > 0.2


def test_tie_uniforms_look_uniform_and_independent() -> None:
    indptr = np.arange(0, 200_001, 100, dtype=np.int64)  # 2,000 cells of 100 entries
    u = tie_uniforms(indptr, 5)
    n = u.size
    assert np.all((u >= 0) & (u < 1)) and np.all(u * 2**32 == np.floor(u * 2**32))
    # Moments and lag-1 correlation within 5 standard errors of a uniform's.
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 5 / np.sqrt(n)
    # Neighbouring cells (entry j of cell c vs of cell c + 1) are uncorrelated too.
    by_cell = u.reshape(2000, 100)
    assert abs(np.corrcoef(by_cell[:-1].ravel(), by_cell[1:].ravel())[0, 1]) < 5 / np.sqrt(n)


def test_quantile_bins_reject_bad_tie_break_arguments(counts: sp.csr_matrix) -> None:
    with pytest.raises(ValueError, match="needs a seed"):
        quantile_bins(counts, 51)
    with pytest.raises(ValueError, match="tie_break"):
        quantile_bins(counts, 51, seed=1, tie_break="lowest")
    with pytest.raises(ValueError, match="seed"):
        quantile_bins(counts, 51, seed=-1)
    with pytest.raises(ValueError, match="cell_offset"):
        quantile_bins(counts, 51, seed=1, cell_offset=-3)


@pytest.mark.parametrize("n_bins", [0, 1, 257])
def test_quantile_bins_reject_unrepresentable_bin_counts(n_bins: int) -> None:
    X = random_counts(5, 10, density=0.5, mean=3.0, seed=0)
    with pytest.raises(ValueError, match="n_bins"):
        quantile_bins_csr(X.indptr, X.data, n_bins, tie_break="highest")


@pytest.mark.parametrize("tie_break", TIE_BREAKS)
def test_quantile_bins_equal_reference_on_mouse_e18(mouse_e18: ad.AnnData, tie_break: str) -> None:
    X = sp.csr_matrix(mouse_e18.X)
    for n_bins in (11, 51):
        got, want = bins_and_reference(X, n_bins, tie_break)
        np.testing.assert_array_equal(got, want)


def scgpt_digitize_verbatim(x: np.ndarray, bins: np.ndarray, side: str = "both") -> np.ndarray:
    """scGPT 0.2.4 `scgpt/preprocess.py::_digitize`, verbatim (its own np.random)."""
    assert x.ndim == 1 and bins.ndim == 1

    left_digits = np.digitize(x, bins)
    if side == "one":
        return left_digits

    right_difits = np.digitize(x, bins, right=True)

    rands = np.random.rand(len(x))  # uniform random numbers  # noqa: NPY002 (scGPT's own)

    digits = rands * (right_difits - left_digits) + left_digits
    digits = np.ceil(digits).astype(np.int64)
    return digits


def scgpt_preprocessor_bins(X: sp.csr_matrix, n_bins: int) -> np.ndarray:
    """Step 6 of scGPT 0.2.4's `Preprocessor.__call__`, one dense row at a time (scGPT
    densifies the whole layer first), returning the bins of X's stored entries."""
    out = np.zeros(X.nnz, dtype=np.int64)
    for cell in range(X.shape[0]):
        row = X[cell].toarray().ravel().astype(np.float64)
        if row.max() == 0:
            continue
        non_zero_ids = row.nonzero()
        non_zero_row = row[non_zero_ids]
        bins = np.quantile(non_zero_row, np.linspace(0, 1, n_bins - 1))
        non_zero_digits = scgpt_digitize_verbatim(non_zero_row, bins)
        assert non_zero_digits.min() >= 1
        assert non_zero_digits.max() <= n_bins - 1
        binned_row = np.zeros_like(row, dtype=np.int64)
        binned_row[non_zero_ids] = non_zero_digits
        out[X.indptr[cell] : X.indptr[cell + 1]] = binned_row[
            X.indices[X.indptr[cell] : X.indptr[cell + 1]]
        ]
    return out


class BinLaw(NamedTuple):
    """Exact law of the per-bin counts and of the mean bin under scGPT's rule."""

    expected: np.ndarray  # expected number of non-zeros per bin, bins 0..n_bins-1
    variance: np.ndarray  # variance of that number
    mean: float  # expected mean bin of the non-zeros
    mean_variance: float


def scgpt_bin_law(X: sp.csr_matrix, n_bins: int) -> BinLaw:
    """Each non-zero's bin is independent and uniform over (low, edges <= x], where low is
    edges < x when x equals some edges and (edges <= x) - 1 when it equals none."""
    below, at_or_below = tie_ranges(X, n_bins)
    nonzero = X.data != 0
    at_or_below = at_or_below[nonzero]
    low = np.minimum(below[nonzero], at_or_below - 1)
    span = (at_or_below - low).astype(np.float64)
    p = 1.0 / span
    # Each entry adds p (and p (1 - p)) to bins low+1 .. at_or_below: difference arrays.
    expected = np.zeros(n_bins + 1)
    np.add.at(expected, low + 1, p)
    np.add.at(expected, at_or_below + 1, -p)
    variance = np.zeros(n_bins + 1)
    np.add.at(variance, low + 1, p * (1 - p))
    np.add.at(variance, at_or_below + 1, -p * (1 - p))
    n = span.size
    mean = float(np.sum((low + 1 + at_or_below) / 2) / n)
    mean_variance = float(np.sum((span**2 - 1) / 12) / n**2)
    return BinLaw(np.cumsum(expected)[:n_bins], np.cumsum(variance)[:n_bins], mean, mean_variance)


def test_random_bins_follow_scgpts_distribution_on_pbmc1k() -> None:
    if not PBMC1K.exists():
        pytest.skip(f"{PBMC1K} is absent")
    adata = sc.read_10x_h5(PBMC1K)  # gene-expression features only, raw counts
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    X.sort_indices()
    n_bins = 51
    law = scgpt_bin_law(X, n_bins)
    n = X.nnz
    np.random.seed(0)  # noqa: NPY002 (scGPT draws from numpy's global generator)
    theirs = scgpt_preprocessor_bins(X, n_bins)
    ours = quantile_bins(X, n_bins, seed=derive_seed(0, "pbmc1k"))
    highest = quantile_bins(X, n_bins, tie_break="highest")
    # Family-wise 1e-3 over the n_bins - 1 bin counts and the mean, two-sided (Bonferroni);
    # the tolerance is z standard deviations of the quantity's exact sampling distribution.
    z = float(stats.norm.isf(1e-3 / (2 * n_bins)))
    share_sd = np.sqrt(law.variance[1:]) / n
    mean_sd = np.sqrt(law.mean_variance)

    def share(bins: np.ndarray) -> np.ndarray:
        return np.bincount(bins, minlength=n_bins)[1:] / n

    expected_share = law.expected[1:] / n
    for bins in (ours, theirs):  # each agrees with the law ...
        assert np.all(np.abs(share(bins) - expected_share) <= z * share_sd)
        assert abs(bins.mean() - law.mean) <= z * mean_sd
    # ... and with the other: the difference of two independent draws has twice the variance.
    assert np.all(np.abs(share(ours) - share(theirs)) <= z * np.sqrt(2) * share_sd)
    assert abs(ours.mean() - theirs.mean()) <= z * np.sqrt(2) * mean_sd
    # The deterministic rule is far outside: it never uses bins 1-10 (scGPT ~20% of non-zeros).
    assert share(highest)[:10].sum() == 0
    assert expected_share[:10].sum() > 0.15
    assert abs(highest.mean() - law.mean) > 100 * mean_sd


# --------------------------------------------------------------------------------------------
# Rank order
# --------------------------------------------------------------------------------------------


def assert_same_ranks(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def assert_rank_order_definition(
    X: sp.csr_matrix,
    total_counts: np.ndarray,
    gene_median: np.ndarray,
    max_len: int,
    ranked: tuple[np.ndarray, np.ndarray],
) -> None:
    """Check the defining properties directly: kept genes, descending values, ties by gene."""
    out_indptr, out_indices = ranked
    for cell in range(X.shape[0]):
        row = X[cell]
        median = gene_median[row.indices]
        with np.errstate(divide="ignore"):
            values = row.data.astype(np.float64) / total_counts[cell] * 10_000 / median
        values[~(median > 0)] = 0.0
        expressed = row.indices[values > 0]
        genes = out_indices[out_indptr[cell] : out_indptr[cell + 1]]
        assert len(genes) == min(len(expressed), max_len)
        assert len(set(genes.tolist())) == len(genes)
        assert set(genes.tolist()) <= set(expressed.tolist())
        value_of = dict(zip(row.indices.tolist(), values.tolist(), strict=True))
        ranked_values = [value_of[g] for g in genes.tolist()]
        pairs = list(zip(ranked_values, genes.tolist(), strict=True))
        for (v1, g1), (v2, g2) in pairwise(pairs):
            assert v1 > v2 or (v1 == v2 and g1 < g2)
        if 0 < len(genes) < len(expressed):  # truncated: nothing dropped outranks the last kept
            dropped = [value_of[g] for g in set(expressed.tolist()) - set(genes.tolist())]
            assert max(dropped) <= ranked_values[-1]


def gene_medians(n_genes: int, kind: str, seed: int) -> np.ndarray:
    """Per-gene non-zero medians of normalized counts; 0: outside the vocabulary."""
    rng = np.random.default_rng(seed)
    if kind == "ones":  # every median 1: values tie whenever counts do
        median = np.ones(n_genes)
    elif kind == "histogram":  # on a log2 grid (gene_stats.RESOLUTION bins per octave): many ties
        median = np.exp2((rng.integers(-200, 400, size=n_genes) * 4 + 0.5) / RESOLUTION)
    elif kind == "lognormal":
        median = rng.lognormal(0.0, 1.0, size=n_genes)
    else:  # values a hair apart: long runs the radix window cannot separate
        median = 1 / (1 + rng.permutation(n_genes) * 1e-13)
    median[rng.random(n_genes) < 0.1] = 0.0  # genes outside the vocabulary
    return median


@pytest.mark.parametrize("median_kind", ["ones", "histogram", "lognormal", "near_ties"])
@pytest.mark.parametrize("max_len", [0, 1, 17, 150, 2048])
def test_rank_order_equals_reference(median_kind: str, max_len: int) -> None:
    # density 0.5 of 600 genes: ~300 genes per cell, past the comparison-sort cutoff; the
    # sparse cells stay below it.
    X = random_counts(120, 600, density=0.5, mean=4.0, seed=7)
    X = sp.vstack([X, random_counts(40, 600, density=0.05, mean=4.0, seed=8)]).tocsr()
    total = qc_metrics(X, np.zeros(X.shape[1], dtype=bool)).total_counts
    median = gene_medians(X.shape[1], median_kind, seed=max_len)
    got = rank_order(X.indptr, X.indices, X.data, total, median, max_len)
    assert got[1].dtype == np.int32
    assert_same_ranks(
        got, rank_order_reference(X.indptr, X.indices, X.data, total, median, max_len)
    )
    assert_same_ranks(
        got, rank_order(X.indptr, X.indices, X.data, total, median, max_len, parallel=True)
    )
    assert_rank_order_definition(X, total, median, max_len, got)


@pytest.mark.parametrize("median_kind", ["ones", "near_ties"])
def test_rank_order_breaks_ties_by_gene_even_with_unsorted_indices(median_kind: str) -> None:
    X = random_counts(60, 400, density=0.6, mean=2.0, seed=11)
    rng = np.random.default_rng(11)
    shuffled = X.copy()
    for cell in range(X.shape[0]):
        start, end = X.indptr[cell], X.indptr[cell + 1]
        order = start + rng.permutation(end - start)
        shuffled.indices[start:end] = X.indices[order]
        shuffled.data[start:end] = X.data[order]
    shuffled.has_sorted_indices = False
    total = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    median = gene_medians(X.shape[1], median_kind, seed=3)
    got = rank_order(shuffled.indptr, shuffled.indices, shuffled.data, total, median, 100)
    assert_same_ranks(got, rank_order(X.indptr, X.indices, X.data, total, median, 100))
    assert_same_ranks(
        got,
        rank_order_reference(shuffled.indptr, shuffled.indices, shuffled.data, total, median, 100),
    )


def test_kernels_accept_other_index_and_count_dtypes(counts: sp.csr_matrix) -> None:
    indptr, indices, data = counts.indptr, counts.indices, counts.data
    total = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    median = gene_medians(counts.shape[1], "histogram", seed=5)
    mito_mask = np.arange(counts.shape[1]) < 20
    for other in (
        (indptr.astype(np.int64), indices.astype(np.int64), data.astype(np.float32)),
        (indptr.astype(np.int32), indices.astype(np.int32), data.astype(np.uint16)),
    ):
        assert_same_ranks(
            rank_order(*other, total, median, 40),
            rank_order(indptr, indices, data, total, median, 40),
        )
        np.testing.assert_array_equal(
            quantile_bins_csr(other[0], other[2], 51, seed=1),
            quantile_bins_csr(indptr, data, 51, seed=1),
        )
        for a, b in zip(
            qc_metrics_csr(*other, mito_mask),
            qc_metrics_csr(indptr, indices, data, mito_mask),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)


def test_rank_order_on_a_gathered_batch_equals_rows_of_the_whole() -> None:
    X = random_counts(1000, 800, density=0.3, mean=4.0, seed=12)
    total = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    median = gene_medians(X.shape[1], "histogram", seed=12)
    whole_indptr, whole = rank_order(X.indptr, X.indices, X.data, total, median, 64)
    batch = np.sort(np.random.default_rng(12).choice(X.shape[0], size=256, replace=False))
    B = X[batch]
    indptr, indices = rank_order(B.indptr, B.indices, B.data, total[batch], median, 64)
    for i, cell in enumerate(batch):
        np.testing.assert_array_equal(
            indices[indptr[i] : indptr[i + 1]], whole[whole_indptr[cell] : whole_indptr[cell + 1]]
        )


def test_rank_order_runs_concurrently_in_threads() -> None:
    # Loader threads call the serial kernel at once; it releases the GIL and shares no state.
    X = random_counts(400, 800, density=0.3, mean=4.0, seed=13)
    total = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    median = gene_medians(X.shape[1], "histogram", seed=13)
    batches = [X[lo : lo + 50] for lo in range(0, X.shape[0], 50)]

    def rank(B: sp.csr_matrix, lo: int) -> tuple[np.ndarray, np.ndarray]:
        return rank_order(B.indptr, B.indices, B.data, total[lo : lo + 50], median, 100)

    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(rank, batches, range(0, X.shape[0], 50)))
    for (B, lo), got in zip(
        zip(batches, range(0, X.shape[0], 50), strict=True), threaded, strict=True
    ):
        assert_same_ranks(got, rank(B, lo))


def test_rank_order_drops_genes_without_median_and_handles_empty_rows() -> None:
    X = sp.csr_matrix(np.array([[0, 0, 0, 0], [5, 1, 0, 5], [0, 0, 2, 0], [3, 3, 3, 3]]))
    median = np.array([1.0, 1.0, 0.0, 1.0])
    indptr, indices = rank_order_matrix(X, median, 10)
    cells = [indices[indptr[c] : indptr[c + 1]].tolist() for c in range(X.shape[0])]
    # Written out from the definition: descending value, ties by gene, gene 2 (median 0) dropped.
    assert cells == [[], [0, 3, 1], [], [0, 1, 3]]


def test_rank_order_matrix_normalizes_by_row_sums(counts: sp.csr_matrix) -> None:
    median = gene_medians(counts.shape[1], "lognormal", seed=4)
    total = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    assert_same_ranks(
        rank_order_matrix(counts, median, 50),
        rank_order(counts.indptr, counts.indices, counts.data, total, median, 50),
    )


def test_rank_order_rejects_out_of_range_genes(counts: sp.csr_matrix) -> None:
    total = np.ones(counts.shape[0])
    with pytest.raises(ValueError, match="outside"):
        rank_order(counts.indptr, counts.indices, counts.data, total, np.ones(100), 10)


def test_rank_order_equals_reference_on_mouse_e18(mouse_e18: ad.AnnData) -> None:
    X = sp.csr_matrix(mouse_e18.X)
    total = qc_metrics(X, np.zeros(X.shape[1], dtype=bool)).total_counts
    median = gene_medians(X.shape[1], "histogram", seed=0)
    for max_len in (20, 2048):
        assert_same_ranks(
            rank_order(X.indptr, X.indices, X.data, total, median, max_len),
            rank_order_reference(X.indptr, X.indices, X.data, total, median, max_len),
        )
