"""Benchmark the preprocessing kernels of cellfoundry.discretize on one core.

Builds a deterministic synthetic count matrix (negative-binomial-like counts, ~2,000 non-zeros
per cell), then times, as the median of several repeats:

- QC metrics: ``qc_metrics`` against ``scanpy.pp.calculate_qc_metrics``;
- scGPT quantile binning: ``quantile_bins`` with scGPT's random tie-break (the default) and
  with the deterministic highest-bin rule, against the dense-row reference; the ratio of the
  two rules' times is printed (the random rule's cost);
- Geneformer-style rank order: ``rank_order`` against the per-row numpy stable argsort, on the
  whole matrix and on gathered 256-cell batches as the shard loader sees them;
- the three kernels in a row.

Binning and rank order are checked to equal their references before anything is reported.
References are timed on a subset of cells. Numba and BLAS are pinned to one thread, and
throughput is cells per CPU-second of this process, which is what one core delivers even when
the machine is shared; wall-clock throughput is printed next to it.

Usage: ``python benchmarks/bench_preprocess.py [--cells 10000 --genes 20000 --nnz 2000]``.
"""

from __future__ import annotations

import os

# Before numba (and numpy's BLAS) start their thread pools: targets are per core.
os.environ["NUMBA_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp

from cellfoundry.discretize import (
    qc_metrics,
    quantile_bins,
    quantile_bins_reference,
    rank_order,
    rank_order_reference,
    tie_uniforms,
)
from cellfoundry.gene_stats import compute_gene_stats, nonzero_medians

MOUSE_E18 = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "mouse_e18_brain_10k_cells_1000genes.h5ad"
)
N_BINS = 51
TIE_SEED = 1
MAX_LEN = 2048
BATCH = 256


@dataclass(frozen=True)
class Timing:
    """Median CPU and wall seconds of one call."""

    cpu_s: float
    wall_s: float


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    step: str
    implementation: str
    n_cells: int
    timing: Timing
    baseline: Row | None = None

    @property
    def per_core(self) -> float:
        return self.n_cells / self.timing.cpu_s

    @property
    def wall(self) -> float:
        return self.n_cells / self.timing.wall_s


def time_call(fn: Callable[[], object], repeats: int) -> Timing:
    """Median CPU and wall time of ``fn()`` over ``repeats`` calls."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return Timing(float(np.median(cpu)), float(np.median(wall)))


def synthetic_counts(n_cells: int, n_genes: int, nnz: int, seed: int = 0) -> sp.csr_matrix:
    """Cells x genes counts: gene detection rates and means spread log-normally, cell sizes
    varying, non-zero counts 1 + negative binomial (dispersion 0.5), ~``nnz`` per cell."""
    rng = np.random.default_rng(seed)
    gene_weight = rng.lognormal(0.0, 1.0, size=n_genes)
    gene_extra = 4.0 * gene_weight / gene_weight.mean()  # mean count above 1, before cell size
    detection = gene_weight / gene_weight.sum() * nnz
    indptr = [np.zeros(1, dtype=np.int64)]
    indices, data = [], []
    block = max(1, 4_000_000 // n_genes)
    for lo in range(0, n_cells, block):
        hi = min(lo + block, n_cells)
        size = rng.lognormal(0.0, 0.3, size=(hi - lo, 1))
        rows, cols = np.nonzero(rng.random((hi - lo, n_genes)) < np.minimum(detection * size, 1))
        extra = gene_extra[cols] * size[rows, 0]
        values = 1 + rng.negative_binomial(0.5, 0.5 / (0.5 + extra))
        indptr.append(indptr[-1][-1] + np.cumsum(np.bincount(rows, minlength=hi - lo)))
        indices.append(cols.astype(np.int32))
        data.append(values.astype(np.int32))
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
        shape=(n_cells, n_genes),
    )


def corpus_gene_medians(X: sp.csr_matrix, total_counts: np.ndarray, seed: int = 0) -> np.ndarray:
    """Non-zero median of normalized expression per gene, from the pipeline's mergeable gene
    statistics; 10% of genes are left out (median 0) as if outside the vocabulary."""
    medians, _ = nonzero_medians(
        compute_gene_stats(X, np.arange(X.shape[1]).astype(str), total_counts)
    )
    medians = np.nan_to_num(medians, nan=0.0)
    medians[np.random.default_rng(seed).random(X.shape[1]) < 0.1] = 0.0
    return medians


def scanpy_qc(X: sp.csr_matrix, mito_mask: np.ndarray) -> Callable[[], object]:
    import anndata as ad
    import scanpy as sc

    adata = ad.AnnData(X)
    adata.var["mt"] = mito_mask

    def run() -> object:
        # The three metrics we compute; scanpy also computes per-gene metrics, always.
        return sc.pp.calculate_qc_metrics(
            adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=False
        )

    return run


def benchmark(name: str, X: sp.csr_matrix, mito_mask: np.ndarray, n_reference: int) -> list[Row]:
    """Time every step on ``X``; references run on its first ``n_reference`` cells."""
    n = X.shape[0]
    sub = X[:n_reference]
    n_sub = sub.shape[0]
    total = qc_metrics(X, mito_mask).total_counts
    scale = corpus_gene_medians(X, total)

    # Warm up (compile or load from the cache) on a few cells of each dtype in play.
    qc_metrics(X[:8], mito_mask)
    quantile_bins(X[:8], N_BINS, seed=TIE_SEED)
    quantile_bins(X[:8], N_BINS, tie_break="highest")
    rank_order(X[:8].indptr, X[:8].indices, X[:8].data, total[:8], scale, MAX_LEN)

    # Identical outputs before any timing is reported.
    uniforms = tie_uniforms(sub.indptr, TIE_SEED)
    if not np.array_equal(
        quantile_bins(sub, N_BINS, seed=TIE_SEED), quantile_bins_reference(sub, N_BINS, uniforms)
    ) or not np.array_equal(
        quantile_bins(sub, N_BINS, tie_break="highest"), quantile_bins_reference(sub, N_BINS)
    ):
        raise AssertionError(f"{name}: quantile_bins differs from the reference")
    args_sub = (sub.indptr, sub.indices, sub.data, total[:n_sub], scale, MAX_LEN)
    ours, ref = rank_order(*args_sub), rank_order_reference(*args_sub)
    if not (np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1])):
        raise AssertionError(f"{name}: rank_order differs from the reference")

    rng = np.random.default_rng(1)
    batches = []
    for _ in range(max(1, min(40, n // BATCH))):
        cells = np.sort(rng.choice(n, size=min(BATCH, n), replace=False))
        batch = X[cells]
        batches.append((batch.indptr, batch.indices, batch.data, total[cells], scale, MAX_LEN))

    def pipeline() -> None:
        qc = qc_metrics(X, mito_mask)
        quantile_bins(X, N_BINS, seed=TIE_SEED)
        rank_order(X.indptr, X.indices, X.data, qc.total_counts, scale, MAX_LEN)

    def batched_rank_order() -> None:
        for batch_args in batches:
            rank_order(*batch_args)

    scanpy_run = scanpy_qc(X, mito_mask)
    scanpy_run()  # warm scanpy's own numba kernels
    qc_base = Row("QC metrics", "scanpy.pp.calculate_qc_metrics", n, time_call(scanpy_run, 3))
    bin_base = Row(
        f"quantile bins ({N_BINS})",
        "dense-row reference (np.quantile + np.digitize)",
        n_sub,
        time_call(lambda: quantile_bins_reference(sub, N_BINS), 3),
    )
    rank_base = Row(
        f"rank order (top {MAX_LEN})",
        "numpy per-row stable argsort",
        n_sub,
        time_call(lambda: rank_order_reference(*args_sub), 3),
    )
    pipe_base_s = sum(1.0 / r.per_core for r in (qc_base, bin_base, rank_base))
    pipe_base_wall = sum(1.0 / r.wall for r in (qc_base, bin_base, rank_base))
    pipe_base = Row(
        "QC + bins + rank order",
        "the three baselines (sum of per-cell times)",
        1,
        Timing(pipe_base_s, pipe_base_wall),
    )
    n_batched = sum(len(b[0]) - 1 for b in batches)
    batch_base = Row(
        f"rank order, {BATCH}-cell batches",
        "numpy per-row stable argsort",
        n_sub,
        rank_base.timing,
    )
    return [
        qc_base,
        Row(
            "QC metrics",
            "cellfoundry qc_metrics",
            n,
            time_call(lambda: qc_metrics(X, mito_mask), 7),
            qc_base,
        ),
        bin_base,
        Row(
            bin_base.step,
            "cellfoundry quantile_bins, tie_break=highest",
            n,
            time_call(lambda: quantile_bins(X, N_BINS, tie_break="highest"), 5),
            bin_base,
        ),
        Row(
            bin_base.step,
            "cellfoundry quantile_bins, tie_break=random (scGPT)",
            n,
            time_call(lambda: quantile_bins(X, N_BINS, seed=TIE_SEED), 5),
            bin_base,
        ),
        rank_base,
        Row(
            rank_base.step,
            "cellfoundry rank_order",
            n,
            time_call(lambda: rank_order(X.indptr, X.indices, X.data, total, scale, MAX_LEN), 5),
            rank_base,
        ),
        Row(
            batch_base.step,
            "cellfoundry rank_order per batch",
            n_batched,
            time_call(batched_rank_order, 5),
            batch_base,
        ),
        pipe_base,
        Row(pipe_base.step, "cellfoundry, one after another", n, time_call(pipeline, 5), pipe_base),
    ]


def print_table(title: str, shape: tuple[int, int], nnz: int, rows: list[Row]) -> None:
    print(f"\n### {title}: {shape[0]:,} cells x {shape[1]:,} genes, {nnz / shape[0]:,.0f} nnz/cell")
    print()
    print("| step | implementation | cells/s per core | ratio vs baseline | wall cells/s |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        ratio = (
            "1.00 (baseline)"
            if row.baseline is None
            else (f"{row.per_core / row.baseline.per_core:,.1f}x")
        )
        print(
            f"| {row.step} | {row.implementation} | {row.per_core:,.0f} | {ratio} "
            f"| {row.wall:,.0f} |"
        )
    by_name = {row.implementation: row for row in rows}
    highest = by_name["cellfoundry quantile_bins, tie_break=highest"]
    random = by_name["cellfoundry quantile_bins, tie_break=random (scGPT)"]
    print(
        f"\nquantile bins: tie_break=random takes {highest.per_core / random.per_core:.2f}x the "
        "CPU time of tie_break=highest (same run)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000, help="non-zeros per cell, about")
    parser.add_argument("--reference-cells", type=int, default=1_000)
    args = parser.parse_args()

    numba.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(
        f"numba {numba.__version__}, numpy {np.__version__}, threads {numba.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    X = synthetic_counts(args.cells, args.genes, args.nnz)
    mito_mask = np.zeros(args.genes, dtype=bool)
    mito_mask[:13] = True  # 13 protein-coding mitochondrial genes
    rows = benchmark("synthetic", X, mito_mask, args.reference_cells)
    print_table("Synthetic counts", X.shape, X.nnz, rows)

    if MOUSE_E18.exists():
        import anndata as ad

        adata = ad.read_h5ad(MOUSE_E18)
        X = sp.csr_matrix(adata.X)
        names = adata.var["gene_name"].astype(str).str.lower()
        rows = benchmark(
            "mouse_e18", X, names.str.startswith("mt-").to_numpy(), args.reference_cells
        )
        print_table(f"Real: {MOUSE_E18.name}", X.shape, X.nnz, rows)
    print(
        f"\nQuantile bins n_bins={N_BINS} (pipeline row: tie_break=random); rank order max_len={MAX_LEN}, gene scale from "
        "log2-histogram medians. References timed on the first "
        f"{args.reference_cells:,} cells; the pipeline baseline adds the three baselines' "
        "per-cell times."
    )


if __name__ == "__main__":
    main()
