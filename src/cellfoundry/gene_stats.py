"""Per-gene statistics: computed per dataset, merged per species.

Corpus-level quantities (which genes are detected, highly variable genes, Geneformer's
non-zero medians) must not be written into per-dataset files, or adding a dataset would
reprocess all others. Instead each dataset writes mergeable sufficient statistics, keyed by
Ensembl ID, and one job per species sums them:

- `n_obs`: cells of the datasets that measured the gene (zeros count for means),
- `n_cells`: cells with a non-zero count,
- `sum`, `sum_sq`: of the normalised value (count / cell total x target_sum),
- `hist_bin`, `hist_count`: a histogram of the non-zero normalised values on a log2 grid of
  1/64 octave (~1.1% wide bins). Histograms add exactly across datasets, so the merged
  median does not depend on dataset order; Geneformer itself merges t-digests.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import polars as pl
import scipy.sparse as sp

from cellfoundry.discretize import log2_bins, median_from_histogram

# Histogram resolution: bins per octave of the normalised value.
RESOLUTION = 64
SCHEMA = {
    "gene_id": pl.Utf8,
    "n_obs": pl.Int64,
    "n_cells": pl.Int64,
    "sum": pl.Float64,
    "sum_sq": pl.Float64,
    "hist_bin": pl.List(pl.Int32),
    "hist_count": pl.List(pl.Int64),
}


def compute_gene_stats(
    X: sp.csr_matrix,
    gene_ids: np.ndarray,
    total_counts: np.ndarray,
    *,
    target_sum: float = 10_000.0,
) -> pl.DataFrame:
    """Sufficient statistics of one count matrix (cells x genes, columns named by `gene_ids`).

    `total_counts` is each cell's total over all of its genes (as in QC), the denominator of
    the normalisation, as in Geneformer's tokenizer.
    """
    X = sp.csr_matrix(X)
    n_obs, n_genes = X.shape
    cell_of = np.repeat(np.arange(n_obs), np.diff(X.indptr))
    scale = np.divide(target_sum, total_counts, out=np.zeros(n_obs), where=total_counts > 0)
    values = X.data.astype(np.float64) * scale[cell_of]
    genes = X.indices.astype(np.int64)
    n_cells = np.bincount(genes, minlength=n_genes)
    sums = np.bincount(genes, weights=values, minlength=n_genes)
    sums_sq = np.bincount(genes, weights=values * values, minlength=n_genes)
    positive = values > 0
    hist = (
        pl.DataFrame({"gene": genes[positive], "bin": log2_bins(values[positive], RESOLUTION)})
        .group_by("gene", "bin")
        .len(name="count")
        .sort("gene", "bin")
        .group_by("gene", maintain_order=True)
        .agg(
            pl.col("bin").cast(pl.Int32).alias("hist_bin"),
            pl.col("count").cast(pl.Int64).alias("hist_count"),
        )
    )
    frame = pl.DataFrame(
        {
            "gene": np.arange(n_genes),
            "gene_id": np.asarray(gene_ids, dtype=str),
            "n_obs": np.full(n_genes, n_obs, dtype=np.int64),
            "n_cells": n_cells.astype(np.int64),
            "sum": sums,
            "sum_sq": sums_sq,
        }
    )
    frame = frame.join(hist, on="gene", how="left").drop("gene")
    frame = frame.with_columns(
        pl.col("hist_bin").fill_null(pl.lit([], dtype=pl.List(pl.Int32))),
        pl.col("hist_count").fill_null(pl.lit([], dtype=pl.List(pl.Int64))),
    )
    return frame.select(list(SCHEMA)).cast(SCHEMA).sort("gene_id")


def merge_gene_stats(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """Sum statistics of several datasets (or files); the result does not depend on order."""
    if not frames:
        return pl.DataFrame(schema=SCHEMA)
    stacked = pl.concat([f.select(list(SCHEMA)).cast(SCHEMA) for f in frames])
    # Float sums depend on the order of addition. Summing each gene's rows in an order given
    # by their own values (not by dataset order) makes the merged bytes order-independent.
    order = np.lexsort(
        (stacked["sum_sq"].to_numpy(), stacked["sum"].to_numpy(), stacked["gene_id"].to_numpy())
    )
    ordered = stacked[order]
    gene_ids = ordered["gene_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, gene_ids[1:] != gene_ids[:-1]])
    totals = pl.DataFrame(
        {
            "gene_id": gene_ids[starts],
            **{
                column: np.add.reduceat(ordered[column].to_numpy(), starts)
                for column in ("n_obs", "n_cells", "sum", "sum_sq")
            },
        }
    )
    hist = (
        stacked.select("gene_id", "hist_bin", "hist_count")
        .explode("hist_bin", "hist_count")
        .drop_nulls()
        .group_by("gene_id", "hist_bin")
        .agg(pl.col("hist_count").sum())
        .sort("gene_id", "hist_bin")
        .group_by("gene_id", maintain_order=True)
        .agg("hist_bin", "hist_count")
    )
    merged = totals.join(hist, on="gene_id", how="left").with_columns(
        pl.col("hist_bin").fill_null(pl.lit([], dtype=pl.List(pl.Int32))),
        pl.col("hist_count").fill_null(pl.lit([], dtype=pl.List(pl.Int64))),
    )
    return merged.select(list(SCHEMA)).cast(SCHEMA).sort("gene_id")


def summarize(stats: pl.DataFrame) -> pl.DataFrame:
    """Per-gene mean, variance (over all measured cells, ddof=1) and non-zero median."""
    n = stats["n_obs"].to_numpy().astype(np.float64)
    total = stats["sum"].to_numpy()
    mean = np.divide(total, n, out=np.zeros_like(total), where=n > 0)
    var = np.divide(
        stats["sum_sq"].to_numpy() - n * mean * mean, n - 1, out=np.zeros_like(total), where=n > 1
    )
    medians = np.array(
        [
            median_from_histogram(
                np.asarray(b, dtype=np.int32), np.asarray(c, dtype=np.int64), resolution=RESOLUTION
            )
            if len(b)
            else 0.0
            for b, c in zip(stats["hist_bin"].to_list(), stats["hist_count"].to_list(), strict=True)
        ]
    )
    return pl.DataFrame(
        {
            "gene_id": stats["gene_id"],
            "n_obs": stats["n_obs"],
            "n_cells": stats["n_cells"],
            "mean": mean,
            "var": np.maximum(var, 0.0),
            "nonzero_median": medians,
        }
    )


class ImportedMedians(NamedTuple):
    """A gene summary whose medians were replaced by imported ones, and what that changed."""

    summary: pl.DataFrame
    n_imported: int  # genes of the summary that took an imported median
    n_without: int  # genes of the summary absent from the dictionary: median null, not ranked
    n_unused: int  # dictionary genes absent from the summary (never seen in the corpus)


def with_imported_medians(summary: pl.DataFrame, medians: dict[str, float]) -> ImportedMedians:
    """Replace the corpus non-zero medians of a gene summary by imported ones (Geneformer's).

    Geneformer's tokenizer (`TranscriptomeTokenizer`) ranks only the genes of its median
    dictionary: genes without a median are dropped from every cell. Faithfully, a gene of
    the summary absent from `medians` gets a null `nonzero_median`, which the loader treats
    as "not rankable" (like a gene never seen non-zero), so that the tokens of a cell are
    Geneformer's. Other columns are unchanged.

    Parameters
    ----------
    summary
        A species' gene summary (`summarize`): gene_id, n_obs, n_cells, mean, var,
        nonzero_median.
    medians
        Ensembl ID -> non-zero median of count / n_counts x 10,000
        (`vocabulary.read_gene_median_dictionary`).

    Returns
    -------
    The summary with its new medians, and the counts of genes that took one, that have none,
    and of dictionary genes not in the summary.
    """
    imported = pl.DataFrame(
        {"gene_id": list(medians), "imported": list(medians.values())},
        schema={"gene_id": pl.Utf8, "imported": pl.Float64},
    )
    joined = summary.join(imported, on="gene_id", how="left")
    n_imported = int(joined["imported"].is_not_null().sum())
    table = joined.with_columns(pl.col("imported").alias("nonzero_median")).drop("imported")
    return ImportedMedians(
        table.select(summary.columns),
        n_imported,
        summary.height - n_imported,
        len(medians) - n_imported,
    )
