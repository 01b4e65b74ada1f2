"""Shard loader vs anndata backed reads: random batches of 256 cells from several files.

    python benchmarks/bench_loader.py [--cells 100000 --genes 20000 --nnz 2000 --files 3]

Builds a deterministic synthetic corpus (raw integer counts) once under --workdir, written both
as h5ad files (the baseline reads them with `anndata.read_h5ad(backed='r')` and one sorted
fancy index per file per batch, the best anndata does) and as cellfoundry shards. Each loader
then runs in its own single-threaded subprocess (one core), so peak memory is its own. Prints a
markdown table: loader | cells/s | peak RSS | ratio vs anndata backed. No assertions on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SINGLE_THREAD = {
    "NUMBA_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def build_corpus(workdir: Path, n_cells: int, n_genes: int, nnz: int, n_files: int) -> None:
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from cellfoundry.reference import load_bundled
    from cellfoundry.shards import write_shard

    marker = workdir / "corpus.json"
    spec = {"cells": n_cells, "genes": n_genes, "nnz": nnz, "files": n_files}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    genes = load_bundled("hsapiens").table.filter(lambda_coding()).head(n_genes)
    var = pd.DataFrame(
        {"gene_name": genes["gene_name"].to_list()}, index=genes["gene_id"].to_list()
    )
    rng = np.random.default_rng(0)
    popularity = rng.gamma(0.5, 1.0, n_genes)
    popularity /= popularity.sum()
    per_file = np.array_split(np.arange(n_cells), n_files)
    for f, cells in enumerate(per_file):
        indptr = [0]
        indices, data = [], []
        for start in range(0, len(cells), 2_000):
            m = min(2_000, len(cells) - start)
            draw = np.sort(rng.choice(n_genes, size=(m, int(nnz * 1.1)), p=popularity), axis=1)
            keep = np.ones_like(draw, dtype=bool)
            keep[:, 1:] = draw[:, 1:] != draw[:, :-1]
            for row, mask in zip(draw, keep, strict=True):
                genes_row = row[mask][:nnz]
                indices.append(genes_row.astype(np.int32))
                data.append((rng.geometric(0.45, size=len(genes_row))).astype(np.int32))
                indptr.append(indptr[-1] + len(genes_row))
        X = sp.csr_matrix(
            (np.concatenate(data), np.concatenate(indices), np.array(indptr)),
            shape=(len(cells), n_genes),
        )
        obs = pd.DataFrame(
            {"total_counts": np.asarray(X.sum(1)).ravel().astype(float)},
            index=[f"c{f}_{i}" for i in range(len(cells))],
        )
        adata = ad.AnnData(X=X, obs=obs, var=var)
        adata.write_h5ad(workdir / f"part{f}.h5ad")
        shard = workdir / "shards" / f"part{f}"
        if shard.exists():
            import shutil

            shutil.rmtree(shard)
        write_shard(
            adata,
            shard,
            n_bins=51,
            meta={"dataset": "bench", "species": "hsapiens", "file": f"part{f}.h5ad"},
        )
    marker.write_text(json.dumps(spec))


def lambda_coding():
    import polars as pl

    return pl.col("gene_type") == "protein_coding"


def batches(n_cells: int, batch_size: int, n_batches: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        yield np.sort(rng.choice(n_cells, batch_size, replace=False))


def measure(loader: str, workdir: Path, batch_size: int, seconds: float) -> dict:
    """Runs in the child process: read random batches for `seconds`, report cells/s."""
    import numpy as np

    files = sorted(workdir.glob("part*.h5ad"))
    if loader == "anndata_backed":
        import anndata as ad

        handles = [ad.read_h5ad(f, backed="r") for f in files]
        offsets = np.concatenate([[0], np.cumsum([h.n_obs for h in handles])])

        def read(cells):
            out = []
            for i, h in enumerate(handles):
                local = cells[(cells >= offsets[i]) & (cells < offsets[i + 1])] - offsets[i]
                if len(local):
                    out.append(h.X[local])  # one sorted fancy index per file
            return out

        n_cells = int(offsets[-1])
    else:
        import polars as pl

        from cellfoundry.gene_stats import compute_gene_stats, summarize
        from cellfoundry.loader import ShardCollection
        from cellfoundry.reference import load_bundled
        from cellfoundry.vocabulary import from_genes

        shards = sorted((workdir / "shards").iterdir())
        gene_ids = pl.read_parquet(shards[0] / "var.parquet")["gene_id"].to_list()
        mapping = from_genes("hsapiens", sorted(gene_ids), load_bundled("hsapiens"))
        medians = None
        if loader == "cellfoundry_rank":
            # Medians from the first shard are enough to exercise the rank path.
            from cellfoundry.loader import open_shard

            s = open_shard(shards[0])
            import scipy.sparse as sp

            X = sp.csr_matrix(
                (
                    np.asarray(s.counts[: s.indptr[2000]]),
                    np.asarray(s.indices[: s.indptr[2000]]),
                    np.asarray(s.indptr[:2001]),
                ),
                shape=(2000, len(gene_ids)),
            )
            medians = {
                "hsapiens": summarize(
                    compute_gene_stats(X, np.array(gene_ids), s.total_counts[:2000])
                )
            }
        collection = ShardCollection(shards, {"hsapiens": mapping}, medians=medians)
        n_cells = len(collection)

        def read(cells):
            batch = collection.gather(cells)
            if loader == "cellfoundry_rank":
                return collection.rank_batch(batch, max_len=2048)
            return batch

    # Warm up (JIT, page cache), then time.
    for cells in batches(n_cells, batch_size, 3, seed=1):
        read(cells)
    done, start = 0, time.perf_counter()
    for cells in batches(n_cells, batch_size, 10**9, seed=2):
        read(cells)
        done += len(cells)
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    status = memory_status()
    return {
        "loader": loader,
        "cells_per_s": done / elapsed,
        "peak_rss_mb": status["VmHWM"],
        "anon_mb": status["RssAnon"],
        "cells": done,
    }


def memory_status() -> dict[str, float]:
    """Peak resident memory (VmHWM; ru_maxrss would carry the parent's peak over exec) and the
    anonymous part of the resident memory now (memory-mapped shard pages are file-backed: they
    count in RSS but the kernel can drop them)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000)
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cellfoundry-bench-loader"))
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.workdir, args.batch_size, args.seconds)))
        return
    t = time.perf_counter()
    build_corpus(args.workdir, args.cells, args.genes, args.nnz, args.files)
    print(
        f"corpus: {args.cells:,} cells x {args.genes:,} genes, ~{args.nnz:,} non-zeros per cell, "
        f"{args.files} files (built or reused in {time.perf_counter() - t:.0f} s)\n"
    )
    rows = []
    for loader in ("anndata_backed", "cellfoundry", "cellfoundry_rank"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            loader,
            "--workdir",
            str(args.workdir),
            "--batch-size",
            str(args.batch_size),
            "--seconds",
            str(args.seconds),
        ]
        out = subprocess.run(
            cmd, env={**os.environ, **SINGLE_THREAD}, capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["cells_per_s"]
    labels = {
        "anndata_backed": "anndata backed, one sorted fancy index per file per batch",
        "cellfoundry": "cellfoundry ShardCollection.gather (tokens + counts + bins)",
        "cellfoundry_rank": "cellfoundry gather + Geneformer rank order (top 2,048)",
    }
    print(f"random batches of {args.batch_size} cells, one core\n")
    print("| loader | cells/s | peak RSS (MB) | anonymous RSS (MB) | ratio vs anndata backed |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {labels[row['loader']]} | {row['cells_per_s']:,.0f} | {row['peak_rss_mb']:,.0f} "
            f"| {row['anon_mb']:,.0f} | {row['cells_per_s'] / base:.1f}x |"
        )


if __name__ == "__main__":
    main()
