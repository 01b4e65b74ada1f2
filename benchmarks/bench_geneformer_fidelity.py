"""Geneformer tokens of a real file: this code's medians vs the previous rule, against exact ones.

    python benchmarks/bench_geneformer_fidelity.py [--file ../shared/data/human_pbmc1k_10x_cellranger6.h5]

Preprocesses the file (default settings; its own corpus), then tokenizes every cell with
Geneformer's rule (count / n_counts x 10,000 / non-zero median, descending, top 2,048; ties by
token id) three ways: with exact `np.median` medians (the reference), with this code's
medians (`gene_stats`: exact values, codes, histograms), and with the previous rule (the
lower middle value of a merged log2 histogram of 64 bins per octave, taken as its bin's
centre). Prints how many cells agree with the reference on the top-10 genes (in order) and on
the set of the top 2,048, and the share of genes whose median is within 0.1% of `np.median`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 2_048


def previous_median(values: np.ndarray) -> float:
    """The rule before this code: lower middle of a log2 histogram, 64 bins per octave."""
    bins = np.floor(np.log2(values) * 64).astype(np.int64)
    kth = (len(bins) + 1) // 2 - 1  # the value of rank ceil(n/2), 0-based
    return float(np.exp2((np.partition(bins, kth)[kth] + 0.5) / 64))


def tokens(X: sp.csr_matrix, total: np.ndarray, medians: np.ndarray, token_of: np.ndarray) -> list:
    cells = []
    for row in range(X.shape[0]):
        lo, hi = X.indptr[row], X.indptr[row + 1]
        genes = X.indices[lo:hi]
        keep = medians[genes] > 0
        genes = genes[keep]
        value = X.data[lo:hi][keep] / total[row] * 10_000 / medians[genes]
        order = np.lexsort((token_of[genes], -value))[:MAX_LEN]
        cells.append(token_of[genes][order])
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--file",
        type=Path,
        default=REPO.parent / "shared" / "data" / "human_pbmc1k_10x_cellranger6.h5",
    )
    parser.add_argument("--species", default="hsapiens")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    import anndata as ad
    import polars as pl

    from cellfoundry.gene_stats import summarize
    from cellfoundry.preprocess import FileOutputs, PreprocessSettings, preprocess_file
    from cellfoundry.reference import load_bundled
    from cellfoundry.sources import dataset_sources

    reference = load_bundled(args.species)
    (source,) = dataset_sources("bench", args.file).files
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        outputs = FileOutputs(
            out / "x.h5ad",
            out / "shard",
            out / "stats.parquet",
            out / "qc.json",
            out / "cells.parquet",
        )
        preprocess_file(
            "bench", args.species, source, reference, PreprocessSettings(), outputs, n_bins=51
        )
        adata = ad.read_h5ad(outputs.h5ad)
        ours = summarize(pl.read_parquet(outputs.gene_stats))
    X = sp.csr_matrix(adata.X, dtype=np.float64)
    total = adata.obs["total_counts"].to_numpy(np.float64)
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    C = sp.csr_matrix((X.data / total[rows] * 10_000, X.indices, X.indptr), shape=X.shape).tocsc()
    columns = [C.data[C.indptr[g] : C.indptr[g + 1]] for g in range(X.shape[1])]
    exact = np.array([np.median(v) if len(v) else 0.0 for v in columns])
    previous = np.array([previous_median(v) if len(v) else 0.0 for v in columns])
    by_id = dict(zip(ours["gene_id"].to_list(), ours["nonzero_median"].to_list(), strict=True))
    current = np.array([by_id[g] for g in adata.var_names])
    token_of = np.argsort(np.argsort(adata.var_names.to_numpy()))  # token order = Ensembl ID order
    truth = tokens(X, total, exact, token_of)
    detected = exact > 0
    print(f"{args.file.name}: {X.shape[0]} cells, {int(detected.sum())} genes detected\n")
    print(
        "| medians | genes within 0.1% of np.median | worst gene | cells: same top 10 | cells: same top 2,048 set |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, medians in (
        ("previous: log2 histogram, lower middle", previous),
        ("this code: gene_stats", current),
    ):
        error = np.abs(medians[detected] / exact[detected] - 1)
        cells = tokens(X, total, medians, token_of)
        top10 = sum(np.array_equal(a[:10], b[:10]) for a, b in zip(cells, truth, strict=True))
        sets = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(cells, truth, strict=True))
        print(
            f"| {name} | {np.mean(error <= 1e-3):.1%} | {error.max():.1%} | "
            f"{top10} of {len(truth)} | {sets} of {len(truth)} |"
        )


if __name__ == "__main__":
    main()
