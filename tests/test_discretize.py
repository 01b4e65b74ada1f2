"""Tests of the preprocessing kernels against scanpy and plain-numpy references."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from cellfoundry.discretize import (
    _quantile_edges,
    bin_center,
    log2_bins,
    median_from_histogram,
    qc_metrics,
    qc_metrics_csr,
    quantile_bins,
    quantile_bins_csr,
    quantile_bins_reference,
    rank_order,
    rank_order_matrix,
    rank_order_reference,
)

SHARED_DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
MOUSE_E18 = SHARED_DATA / "mouse_e18_brain_10k_cells_1000genes.h5ad"


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


@pytest.mark.parametrize("n_bins", N_BINS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantile_bins_equal_reference_on_random_counts(n_bins: int, seed: int) -> None:
    X = random_counts(200, 400, density=0.3, mean=3.0 + 20 * seed, seed=seed)
    got = quantile_bins(X, n_bins)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, quantile_bins_reference(X, n_bins))


@pytest.mark.parametrize("n_bins", N_BINS)
def test_quantile_bins_equal_reference_on_edge_cases(n_bins: int) -> None:
    X = awkward_rows(300, seed=n_bins)
    got = quantile_bins(X, n_bins)
    np.testing.assert_array_equal(got, quantile_bins_reference(X, n_bins))
    # Every non-zero lands in 1..n_bins-1 and each cell's largest value in the top bin.
    assert got.min() >= 1
    assert got.max() <= n_bins - 1
    for cell in range(X.shape[0]):
        start, end = X.indptr[cell], X.indptr[cell + 1]
        if end > start:
            assert got[start:end][np.argmax(X.data[start:end])] == n_bins - 1


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


def test_quantile_bins_of_non_integer_values_equal_reference() -> None:
    rng = np.random.default_rng(5)
    X = random_counts(100, 300, density=0.3, mean=5.0, seed=5).astype(np.float64)
    X.data[rng.random(X.nnz) < 0.3] += 0.5
    np.testing.assert_array_equal(quantile_bins(X, 51), quantile_bins_reference(X, 51))


def test_quantile_bins_give_zero_to_stored_zeros() -> None:
    X = random_counts(50, 100, density=0.3, mean=3.0, seed=3)
    zeroed = X.copy()
    zeroed.data[::5] = 0  # stored zeros are not values of the cell
    got = quantile_bins(zeroed, 11)
    np.testing.assert_array_equal(got[::5], 0)
    np.testing.assert_array_equal(got, quantile_bins_reference(zeroed, 11))


def test_quantile_bins_parallel_equals_serial(counts: sp.csr_matrix) -> None:
    np.testing.assert_array_equal(
        quantile_bins(counts, 51, parallel=True), quantile_bins(counts, 51)
    )


@pytest.mark.parametrize("n_bins", [0, 1, 257])
def test_quantile_bins_reject_unrepresentable_bin_counts(n_bins: int) -> None:
    X = random_counts(5, 10, density=0.5, mean=3.0, seed=0)
    with pytest.raises(ValueError, match="n_bins"):
        quantile_bins_csr(X.indptr, X.data, n_bins)


def test_quantile_bins_equal_reference_on_mouse_e18(mouse_e18: ad.AnnData) -> None:
    X = sp.csr_matrix(mouse_e18.X)
    for n_bins in (11, 51):
        np.testing.assert_array_equal(quantile_bins(X, n_bins), quantile_bins_reference(X, n_bins))


# --------------------------------------------------------------------------------------------
# Rank order
# --------------------------------------------------------------------------------------------


def assert_same_ranks(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def assert_rank_order_definition(
    X: sp.csr_matrix,
    total_counts: np.ndarray,
    gene_scale: np.ndarray,
    max_len: int,
    ranked: tuple[np.ndarray, np.ndarray],
) -> None:
    """Check the defining properties directly: kept genes, descending values, ties by gene."""
    out_indptr, out_indices = ranked
    for cell in range(X.shape[0]):
        row = X[cell]
        values = row.data.astype(np.float64) / total_counts[cell] * 10_000 * gene_scale[row.indices]
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


def gene_scales(n_genes: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "ones":  # no scaling: values tie whenever counts do
        scale = np.ones(n_genes)
    elif kind == "histogram":  # 1 / bin centers, as the corpus medians give: many exact ties
        scale = 1 / bin_center(rng.integers(-200, 400, size=n_genes))
    elif kind == "lognormal":
        scale = 1 / rng.lognormal(0.0, 1.0, size=n_genes)
    else:  # values a hair apart: long runs the radix window cannot separate
        scale = 1 + rng.permutation(n_genes) * 1e-13
    scale[rng.random(n_genes) < 0.1] = 0.0  # genes outside the vocabulary
    return scale


@pytest.mark.parametrize("scale_kind", ["ones", "histogram", "lognormal", "near_ties"])
@pytest.mark.parametrize("max_len", [0, 1, 17, 150, 2048])
def test_rank_order_equals_reference(scale_kind: str, max_len: int) -> None:
    # density 0.5 of 600 genes: ~300 genes per cell, past the comparison-sort cutoff; the
    # sparse cells stay below it.
    X = random_counts(120, 600, density=0.5, mean=4.0, seed=7)
    X = sp.vstack([X, random_counts(40, 600, density=0.05, mean=4.0, seed=8)]).tocsr()
    total = qc_metrics(X, np.zeros(X.shape[1], dtype=bool)).total_counts
    scale = gene_scales(X.shape[1], scale_kind, seed=max_len)
    got = rank_order(X.indptr, X.indices, X.data, total, scale, max_len)
    assert got[1].dtype == np.int32
    assert_same_ranks(got, rank_order_reference(X.indptr, X.indices, X.data, total, scale, max_len))
    assert_same_ranks(
        got, rank_order(X.indptr, X.indices, X.data, total, scale, max_len, parallel=True)
    )
    assert_rank_order_definition(X, total, scale, max_len, got)


@pytest.mark.parametrize("scale_kind", ["ones", "near_ties"])
def test_rank_order_breaks_ties_by_gene_even_with_unsorted_indices(scale_kind: str) -> None:
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
    scale = gene_scales(X.shape[1], scale_kind, seed=3)
    got = rank_order(shuffled.indptr, shuffled.indices, shuffled.data, total, scale, 100)
    assert_same_ranks(got, rank_order(X.indptr, X.indices, X.data, total, scale, 100))
    assert_same_ranks(
        got,
        rank_order_reference(shuffled.indptr, shuffled.indices, shuffled.data, total, scale, 100),
    )


def test_kernels_accept_other_index_and_count_dtypes(counts: sp.csr_matrix) -> None:
    indptr, indices, data = counts.indptr, counts.indices, counts.data
    total = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    scale = gene_scales(counts.shape[1], "histogram", seed=5)
    mito_mask = np.arange(counts.shape[1]) < 20
    for other in (
        (indptr.astype(np.int64), indices.astype(np.int64), data.astype(np.float32)),
        (indptr.astype(np.int32), indices.astype(np.int32), data.astype(np.uint16)),
    ):
        assert_same_ranks(
            rank_order(*other, total, scale, 40),
            rank_order(indptr, indices, data, total, scale, 40),
        )
        np.testing.assert_array_equal(
            quantile_bins_csr(other[0], other[2], 51), quantile_bins_csr(indptr, data, 51)
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
    scale = gene_scales(X.shape[1], "histogram", seed=12)
    whole_indptr, whole = rank_order(X.indptr, X.indices, X.data, total, scale, 64)
    batch = np.sort(np.random.default_rng(12).choice(X.shape[0], size=256, replace=False))
    B = X[batch]
    indptr, indices = rank_order(B.indptr, B.indices, B.data, total[batch], scale, 64)
    for i, cell in enumerate(batch):
        np.testing.assert_array_equal(
            indices[indptr[i] : indptr[i + 1]], whole[whole_indptr[cell] : whole_indptr[cell + 1]]
        )


def test_rank_order_runs_concurrently_in_threads() -> None:
    # Loader threads call the serial kernel at once; it releases the GIL and shares no state.
    X = random_counts(400, 800, density=0.3, mean=4.0, seed=13)
    total = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    scale = gene_scales(X.shape[1], "histogram", seed=13)
    batches = [X[lo : lo + 50] for lo in range(0, X.shape[0], 50)]

    def rank(B: sp.csr_matrix, lo: int) -> tuple[np.ndarray, np.ndarray]:
        return rank_order(B.indptr, B.indices, B.data, total[lo : lo + 50], scale, 100)

    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(rank, batches, range(0, X.shape[0], 50)))
    for (B, lo), got in zip(
        zip(batches, range(0, X.shape[0], 50), strict=True), threaded, strict=True
    ):
        assert_same_ranks(got, rank(B, lo))


def test_rank_order_drops_unscaled_genes_and_handles_empty_rows() -> None:
    X = sp.csr_matrix(np.array([[0, 0, 0, 0], [5, 1, 0, 5], [0, 0, 2, 0], [3, 3, 3, 3]]))
    scale = np.array([1.0, 1.0, 0.0, 1.0])
    indptr, indices = rank_order_matrix(X, scale, 10)
    cells = [indices[indptr[c] : indptr[c + 1]].tolist() for c in range(X.shape[0])]
    # Written out from the definition: descending value, ties by gene, scale-0 gene 2 dropped.
    assert cells == [[], [0, 3, 1], [], [0, 1, 3]]


def test_rank_order_matrix_normalizes_by_row_sums(counts: sp.csr_matrix) -> None:
    scale = gene_scales(counts.shape[1], "lognormal", seed=4)
    total = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    assert_same_ranks(
        rank_order_matrix(counts, scale, 50),
        rank_order(counts.indptr, counts.indices, counts.data, total, scale, 50),
    )


def test_rank_order_rejects_out_of_range_genes(counts: sp.csr_matrix) -> None:
    total = np.ones(counts.shape[0])
    with pytest.raises(ValueError, match="outside"):
        rank_order(counts.indptr, counts.indices, counts.data, total, np.ones(100), 10)


def test_rank_order_equals_reference_on_mouse_e18(mouse_e18: ad.AnnData) -> None:
    X = sp.csr_matrix(mouse_e18.X)
    total = qc_metrics(X, np.zeros(X.shape[1], dtype=bool)).total_counts
    scale = gene_scales(X.shape[1], "histogram", seed=0)
    for max_len in (20, 2048):
        assert_same_ranks(
            rank_order(X.indptr, X.indices, X.data, total, scale, max_len),
            rank_order_reference(X.indptr, X.indices, X.data, total, scale, max_len),
        )


# --------------------------------------------------------------------------------------------
# Log2 histograms and medians
# --------------------------------------------------------------------------------------------


def histogram(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.unique(log2_bins(values), return_counts=True)


@pytest.mark.parametrize("n", [1, 2, 1001, 5000])
def test_median_of_merged_halves_equals_median_of_whole(n: int) -> None:
    values = np.random.default_rng(n).lognormal(1.0, 2.0, size=n)
    first, second = histogram(values[: n // 2]), histogram(values[n // 2 :])
    whole = histogram(values)
    merged_bins = np.concatenate([first[0], second[0]])
    merged_counts = np.concatenate([first[1], second[1]])
    summed = np.zeros(whole[0].max() - whole[0].min() + 1, dtype=np.int64)
    np.add.at(summed, merged_bins - whole[0].min(), merged_counts)
    np.testing.assert_array_equal(summed[whole[0] - whole[0].min()], whole[1])
    assert median_from_histogram(merged_bins, merged_counts) == median_from_histogram(*whole)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [999, 1000, 20_000])
def test_median_from_histogram_is_within_one_bin_of_numpy(seed: int, n: int) -> None:
    values = np.random.default_rng(seed).lognormal(seed - 2.0, 1.5, size=n)
    estimate = median_from_histogram(*histogram(values))
    assert abs(np.log2(estimate) - np.log2(np.median(values))) <= 1 / 64


def test_median_from_histogram_takes_the_lower_middle_value_for_even_totals() -> None:
    low, high = log2_bins(np.array([1.0, 8.0]))
    assert median_from_histogram(np.array([high, low]), np.array([2, 2])) == bin_center(low)
    assert median_from_histogram(np.array([high, low]), np.array([3, 2])) == bin_center(high)
    assert np.isnan(median_from_histogram(np.array([low]), np.array([0])))
    with pytest.raises(ValueError, match="non-negative"):
        median_from_histogram(np.array([low]), np.array([-1]))


def test_bin_center_lies_inside_its_bin() -> None:
    bins = np.arange(-2000, 2000, dtype=np.int32)
    np.testing.assert_array_equal(log2_bins(bin_center(bins)), bins)
    with pytest.raises(ValueError, match="positive"):
        log2_bins(np.array([1.0, 0.0]))
