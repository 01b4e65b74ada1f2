"""Per-gene statistics: exact values for rarely detected genes, log2 codes, then log2 histograms
for genes seen in more cells, merged per dataset and species; their medians (Geneformer's gene
scaling), means and variances."""

from __future__ import annotations

import io

import anndata as ad
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from cellfoundry.gene_stats import (
    CODE_RESOLUTION,
    RESOLUTION,
    GeneStatsAccumulator,
    merge_gene_stats,
    nonzero_medians,
    summarize,
    write_gene_stats,
)

TARGET = 10_000.0


def accumulate(
    X: sp.csr_matrix,
    genes,
    *,
    block: int = 1000,
    exact_max_cells: int = 10_000,
    quantized_max_cells: int = 10_000,
):
    """Statistics of a cells x genes count matrix, added `block` cells at a time."""
    X = sp.csr_matrix(X)
    total = np.asarray(X.sum(1)).ravel().astype(np.float64)
    stats = GeneStatsAccumulator(
        X.shape[1], exact_max_cells=exact_max_cells, quantized_max_cells=quantized_max_cells
    )
    for start in range(0, X.shape[0], block):
        B = X[start : start + block]
        stats.add_cells(B.indptr, B.indices, B.data, total[start : start + block])
    return stats.table(np.asarray(genes))


def normalized_columns(X: sp.csr_matrix) -> list[np.ndarray]:
    """Each gene's non-zero normalized values in the order of cells, count / total * 10,000,
    in numpy, computed in the order the accumulator defines them."""
    X = sp.csr_matrix(X, dtype=np.float64)
    total = np.asarray(X.sum(1)).ravel()
    C = sp.csc_matrix(X)
    values = C.data / total[C.indices] * TARGET
    return [values[C.indptr[g] : C.indptr[g + 1]] for g in range(C.shape[1])]


def parquet_bytes(table: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    table.write_parquet(buffer, statistics=False)
    return buffer.getvalue()


def synthetic(n_cells: int, n_genes: int, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    depth = rng.lognormal(np.log(3000), 0.5, size=(n_cells, 1))
    share = rng.gamma(0.5, 1.0, size=n_genes)
    share /= share.sum()
    counts = rng.poisson(depth * share)
    counts[:, 0] = 0  # a gene never detected
    return sp.csr_matrix(counts)


@pytest.fixture(scope="module")
def e18(shared_data) -> ad.AnnData:
    return ad.read_h5ad(shared_data / "mouse_e18_brain_10k_cells_1000genes.h5ad")


def test_exact_statistics_equal_numpy_on_a_real_file(e18):
    X = sp.csr_matrix(e18.X)
    X = X[np.asarray(X.sum(1)).ravel() > 0]
    stats = accumulate(X, e18.var_names, block=777)  # 10,000 cells: every value kept
    medians, exact = nonzero_medians(stats)
    columns = normalized_columns(X)
    detected = np.array([len(c) > 0 for c in columns])
    assert exact[detected].all() and not exact[~detected].any()
    assert stats["n_cells"].to_list() == [len(c) for c in columns]
    expected = np.array([np.median(c) if len(c) else np.nan for c in columns])
    assert np.allclose(medians[detected], expected[detected], rtol=1e-12, atol=0)
    assert np.isnan(medians[~detected]).all()
    summary = summarize(stats)
    dense = (sp.diags(1 / np.asarray(X.sum(1)).ravel()) @ X * TARGET).toarray()
    assert np.allclose(summary["mean"].to_numpy(), dense.mean(0), rtol=1e-10)
    assert np.allclose(summary["var"].to_numpy(), dense.var(0, ddof=1), rtol=1e-8, atol=1e-12)
    assert (summary["nonzero_median"].to_numpy()[~detected] == 0).all()


def tiers(stats: pl.DataFrame) -> np.ndarray:
    """Per gene: how many non-zero values each tier holds, as columns (values, codes, hist)."""
    return np.stack(
        [
            stats["values"].list.len().to_numpy(),
            stats["codes"].list.len().to_numpy(),
            stats["hist"].list.sum().fill_null(0).to_numpy(),
        ],
        axis=1,
    )


def test_each_tier_holds_every_value_of_its_genes():
    X = synthetic(3_000, 80, seed=5)
    stats = accumulate(
        X, [f"g{i:02d}" for i in range(80)], exact_max_cells=50, quantized_max_cells=500
    )
    held = tiers(stats)
    n_cells = stats["n_cells"].to_numpy()
    assert np.array_equal(held.sum(1), n_cells)  # every non-zero value once, in one tier
    assert ((held > 0).sum(1) <= 1).all()  # never split between tiers
    assert np.array_equal(held[:, 0] > 0, (n_cells > 0) & (n_cells <= 50))
    assert np.array_equal(held[:, 1] > 0, (n_cells > 50) & (n_cells <= 500))
    assert np.array_equal(held[:, 2] > 0, n_cells > 500)
    assert (held > 0).any(0).all()  # all three tiers in use


def test_coded_medians_are_within_half_a_code():
    X = synthetic(5_000, 120, seed=6)
    stats = accumulate(
        X, [f"g{i:03d}" for i in range(120)], exact_max_cells=50, quantized_max_cells=100_000
    )
    medians, exact = nonzero_medians(stats)
    columns = normalized_columns(X)
    coded = tiers(stats)[:, 1] > 0
    assert coded.sum() > 100 and not exact[coded].any()
    truth = np.array([np.median(c) for c in np.array(columns, dtype=object)[coded]])
    error = np.abs(np.log2(medians[coded] / truth))
    assert error.max() <= 0.5 / CODE_RESOLUTION + 1e-12


def test_histogram_medians_are_within_a_tenth_of_a_percent():
    X = synthetic(20_000, 150, seed=1)
    stats = accumulate(
        X,
        [f"g{i:03d}" for i in range(150)],
        block=4096,
        exact_max_cells=100,
        quantized_max_cells=100,
    )
    medians, exact = nonzero_medians(stats)
    columns = normalized_columns(X)
    many = np.array([len(c) > 100 for c in columns])
    held = tiers(stats)
    assert many.sum() > 100 and not exact[many].any()
    assert (held[many, :2] == 0).all()
    assert held[many, 2].tolist() == [len(c) for c in np.array(columns, dtype=object)[many]]
    truth = np.array([np.median(c) for c in np.array(columns, dtype=object)[many]])
    error = np.abs(medians[many] / truth - 1)
    assert np.mean(error <= 1e-3) >= 0.99
    assert error.max() < 2 ** (1 / RESOLUTION) - 1  # never more than a bin (0.27%)
    few = np.array([0 < len(c) <= 100 for c in columns])
    assert exact[few].all()


def test_statistics_do_not_depend_on_blocks_or_tier_changes():
    X = synthetic(3_000, 60, seed=2)
    genes = [f"g{i:02d}" for i in range(60)]
    tables = [
        accumulate(X, genes, block=block, exact_max_cells=20, quantized_max_cells=300)
        for block in (1, 37, 5000)
    ]
    assert (tiers(tables[0]) > 0).any(0).all()  # all three tiers in use
    first = parquet_bytes(tables[0])
    assert all(parquet_bytes(t) == first for t in tables[1:])


def test_statistics_written_table_by_table_are_the_whole_table(tmp_path):
    """`write_gene_stats` of `tables` (what preprocessing writes, a row group per table) reads
    back as the one table, whatever the tables' size, every tier included."""
    X = synthetic(3_000, 60, seed=2)
    genes = np.array([f"g{i:02d}" for i in range(60)])
    stats = GeneStatsAccumulator(60, exact_max_cells=20, quantized_max_cells=300)
    total = np.asarray(X.sum(1)).ravel().astype(np.float64)
    stats.add_cells(X.indptr, X.indices, X.data, total)
    whole = stats.table(genes)
    assert (tiers(whole) > 0).any(0).all()
    for size in (1, 7, 59, 100):
        write_gene_stats(stats.tables(genes, genes_per_table=size), tmp_path / f"{size}.parquet")
        back = pl.read_parquet(tmp_path / f"{size}.parquet")
        assert back.equals(whole), size
        assert pq.ParquetFile(tmp_path / f"{size}.parquet").num_row_groups == -(-60 // size)


def test_merge_is_whole_file_statistics_and_sorted_inputs_give_the_same_bytes(tmp_path):
    X = synthetic(4_000, 80, seed=3)
    genes = np.array([f"ENSG{i:011d}" for i in range(80)])
    limits = {"exact_max_cells": 300, "quantized_max_cells": 1_500}
    whole = accumulate(X, genes, **limits)
    assert (tiers(whole) > 0).any(0).all()
    paths = []
    for i, (lo, hi) in enumerate([(0, 500), (500, 2100), (2100, 2200), (2200, 4000)]):
        path = tmp_path / f"part{i}.parquet"
        accumulate(X[lo:hi], genes, **limits).write_parquet(path, statistics=False)
        paths.append(path)
    merged = merge_gene_stats(paths, **limits)
    for column in ("gene_id", "n_obs", "n_cells", "values", "codes", "hist_start", "hist"):
        assert merged[column].to_list() == whole[column].to_list(), column
    for column in ("sum", "sum_sq"):
        assert np.allclose(merged[column].to_numpy(), whole[column].to_numpy(), rtol=1e-12)
    medians = nonzero_medians(merged)[0]
    assert np.array_equal(medians, nonzero_medians(whole)[0], equal_nan=True)
    # Callers sort their inputs by name: any listing order gives the same bytes.
    reference = parquet_bytes(merge_gene_stats(sorted(paths), **limits))
    rng = np.random.default_rng(0)
    for _ in range(3):
        shuffled = list(rng.permutation(paths))
        assert parquet_bytes(merge_gene_stats(sorted(shuffled), **limits)) == reference


def test_genes_measured_by_some_files_only_count_their_cells():
    a = accumulate(sp.csr_matrix(np.array([[1, 2], [3, 0], [0, 5]])), ["g1", "g2"])
    b = accumulate(sp.csr_matrix(np.array([[4, 4]])), ["g2", "g3"])
    merged = merge_gene_stats([a, b])
    assert merged["gene_id"].to_list() == ["g1", "g2", "g3"]
    assert merged["n_obs"].to_list() == [3, 4, 1]
    assert merged["n_cells"].to_list() == [2, 3, 1]
    summary = summarize(merged)
    # g2: 2/3, 0, 5/5 of the first file's cells and 4/8 of the second's, times 10,000
    assert np.isclose(summary["mean"][1], (2 / 3 + 0 + 1 + 0.5) * TARGET / 4)
    assert np.isclose(summary["nonzero_median"][1], 2 / 3 * TARGET)


def test_tables_made_with_smaller_thresholds_merge_consistently():
    X = synthetic(400, 30, seed=4)
    genes = [f"g{i:02d}" for i in range(30)]  # names in index order: merges sort by name
    small = accumulate(X[:200], genes, exact_max_cells=5, quantized_max_cells=20)
    large = accumulate(X[200:], genes, exact_max_cells=10_000, quantized_max_cells=10_000)
    assert tiers(small)[:, 2].sum() > 0 and tiers(large)[:, 1:].sum() == 0
    one = merge_gene_stats([small, large], exact_max_cells=10_000, quantized_max_cells=10_000)
    other = merge_gene_stats([large, small], exact_max_cells=10_000, quantized_max_cells=10_000)
    held = tiers(one)
    # A gene's non-zero values are all in one tier, never split.
    assert ((held > 0).sum(1) <= 1).all()
    assert np.array_equal(held.sum(1), one["n_cells"].to_numpy())
    binned = tiers(small)[:, 2] > 0
    assert (held[binned, 2] > 0).all()  # a histogram cannot become values again
    for column in ("n_obs", "n_cells", "hist_start", "hist"):
        assert one[column].to_list() == other[column].to_list(), column
    assert sorted(map(sorted, one["values"].to_list())) == sorted(
        map(sorted, other["values"].to_list())
    )
    # Medians from the merged histograms stay within a bin (0.27%) of the exact ones.
    truth = np.array([np.median(c) if len(c) else np.nan for c in normalized_columns(X)])
    medians, exact = nonzero_medians(one)
    detected = ~np.isnan(truth)
    assert not exact[binned].any()
    assert np.all(np.abs(medians[detected] / truth[detected] - 1) < 2 ** (1 / RESOLUTION) - 1)


def test_pools_that_grow_and_compact_keep_every_value_in_order(monkeypatch):
    # Thousands of genes filling their regions a few cells at a time: regions move as they
    # grow, and the pools grow and slide their regions over the dead space many times.
    from cellfoundry import gene_stats

    compacted = []
    compact = gene_stats._compact_pool
    monkeypatch.setattr(
        gene_stats, "_compact_pool", lambda *args: (compacted.append(args[3]), compact(*args))
    )
    X = synthetic(2_000, 3_000, seed=7)
    stats = accumulate(
        X,
        [f"g{i:04d}" for i in range(3_000)],
        block=9,
        exact_max_cells=100,
        quantized_max_cells=5_000,
    )
    assert compacted.count(0) >= 2 and compacted.count(1) >= 2  # values and codes
    held = tiers(stats)
    assert (held[:, 0] > 0).sum() > 400 and (held[:, 1] > 0).sum() > 2_000
    for gene, column in enumerate(normalized_columns(X)):
        if 0 < len(column) <= 100:
            assert np.array_equal(stats["values"][gene].to_numpy(), column)
        elif len(column) > 100:
            codes = np.floor(-np.log2(column / TARGET) * CODE_RESOLUTION)
            assert np.array_equal(stats["codes"][gene].to_numpy(), codes)
