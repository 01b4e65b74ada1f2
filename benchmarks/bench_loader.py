"""Shard loader at 10 to 10,000 shards, beside a minimal CSR gather and anndata backed reads:
random batches of 256 cells.

    python benchmarks/bench_loader.py [--cells 100000 --genes 20000 --nnz 2000]
                                      [--shards 10 1000 10000] [--seconds 15]

Builds a deterministic synthetic corpus once under --workdir (raw integer counts, ~2,000
non-zeros per cell) and writes the same cells as 10, 1,000 and 10,000 shards, as one plain
memory-mapped CSR matrix (`csr/`: indptr, indices, data as int64/int32/int32 `.npy`) and as 3
h5ad files. Baselines, in the same run: the minimal gather (a compiled loop copying each
cell's indices and data out of the memory-mapped CSR, no vocabulary lookup, no bins: the
ceiling of any loader over this corpus), once with new output arrays per batch as a plain
implementation would, once into one reused output buffer; and anndata, reading the h5ad files
with `anndata.read_h5ad(backed='r')` and one sorted fancy index per file per batch (the best
anndata does). Each measurement runs in its own single-threaded process under `ulimit -n 1024`
(RLIMIT_NOFILE, as on most clusters): start-up (from the shard manifest to the first batch),
cells/s after the lazily mapped shards have been touched, both per second of wall time and per
second of the process's CPU time (the machine may be shared: CPU time is what one core
delivers), peak and anonymous resident memory, and the process's open file descriptors at the
end. Also: Geneformer rank tokens (top 2,048) and two DataLoader worker processes. Prints a
markdown table with ratios against anndata and against the minimal gather (new arrays). No
assertions on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SINGLE_THREAD = {
    "NUMBA_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "POLARS_MAX_THREADS": "1",
}
FD_LIMIT = 1024


def build_corpus(
    workdir: Path, n_cells: int, n_genes: int, nnz: int, shard_counts: list[int]
) -> None:
    """One big shard generated block by block, then re-cut into each number of shards, and
    3 h5ad files for the baseline."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import polars as pl
    import scipy.sparse as sp

    from cellfoundry.discretize import quantile_bins_csr
    from cellfoundry.reference import load_bundled
    from cellfoundry.shards import ShardWriter

    spec = {"cells": n_cells, "genes": n_genes, "nnz": nnz, "shards": sorted(shard_counts)}
    marker = workdir / "corpus.json"
    if marker.is_file():  # reused when it holds these cells cut into (at least) these shards
        built = json.loads(marker.read_text())
        if all(built[key] == spec[key] for key in ("cells", "genes", "nnz")):
            if set(shard_counts) <= set(built["shards"]):
                return
            shard_counts = spec["shards"] = sorted(set(shard_counts) | set(built["shards"]))
    workdir.mkdir(parents=True, exist_ok=True)
    genes = (
        load_bundled("hsapiens").table.filter(pl.col("gene_type") == "protein_coding").head(n_genes)
    )
    var = pd.DataFrame(
        {"gene_name": genes["gene_name"].to_list()}, index=genes["gene_id"].to_list()
    )
    rng = np.random.default_rng(0)
    popularity = rng.gamma(0.5, 1.0, n_genes)
    popularity /= popularity.sum()
    whole = workdir / "whole"
    if whole.exists():
        import shutil

        shutil.rmtree(whole)
    writer = ShardWriter(whole, n_bins=51)
    blocks = []
    for start in range(0, n_cells, 5_000):
        m = min(5_000, n_cells - start)
        draw = np.sort(rng.choice(n_genes, size=(m, int(nnz * 1.1)), p=popularity), axis=1)
        keep = np.ones_like(draw, dtype=bool)
        keep[:, 1:] = draw[:, 1:] != draw[:, :-1]
        lengths = np.minimum(keep.sum(1), nnz)
        rank = np.cumsum(keep, axis=1)
        keep &= rank <= nnz
        indices = draw[keep].astype(np.int32)
        counts = rng.geometric(0.45, size=len(indices)).astype(np.int32)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        totals = np.add.reduceat(counts, indptr[:-1]).astype(np.float64)
        bins = quantile_bins_csr(indptr, counts, 51, tie_break="highest")
        writer.append(indptr, indices, counts, bins, totals)
        if len(blocks) < 20:  # the h5ad baseline holds the same cells (first 100k)
            blocks.append(sp.csr_matrix((counts, indices, indptr), shape=(m, n_genes)))
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_cells)])
    writer.close(var, obs, {"dataset": "bench", "species": "hsapiens", "file": "whole.h5ad"})
    X = sp.vstack(blocks).tocsr()
    for f, cells in enumerate(np.array_split(np.arange(X.shape[0]), 3)):
        ad.AnnData(X=X[cells], var=var).write_h5ad(workdir / f"part{f}.h5ad")
    indptr = np.load(whole / "indptr.npy")
    entries = np.load(whole / "entries.npy", mmap_mode="r")
    totals = np.load(whole / "total_counts.npy")
    for n_shards in shard_counts:
        root = workdir / f"shards_{n_shards}"
        rows = []
        for s, cells in enumerate(np.array_split(np.arange(n_cells), n_shards)):
            lo, hi = int(indptr[cells[0]]), int(indptr[cells[-1] + 1])
            out = ShardWriter(root / f"s{s:05d}", n_bins=51)
            part = np.asarray(entries[lo:hi])
            out.append(
                indptr[cells[0] : cells[-1] + 2] - lo,
                part["gene"],
                part["count"],
                part["bin"],
                totals[cells],
            )
            info = out.close(
                var,
                obs.iloc[cells],
                {"dataset": f"d{s:05d}", "species": "hsapiens", "file": f"s{s:05d}.h5ad"},
            )
            rows.append(
                {
                    "shard": str(root / f"s{s:05d}"),
                    "species": "hsapiens",
                    "dataset": info["dataset"],
                    "n_cells": info["n_cells"],
                    "genes_sha256": info["genes_sha256"],
                    "cells": "all",
                }
            )
        pl.DataFrame(rows).write_parquet(root / "manifest.parquet")
    marker.write_text(json.dumps(spec))


def build_csr(workdir: Path) -> None:
    """The whole corpus as one plain CSR matrix (`csr/indptr.npy`, `indices.npy`, `data.npy`),
    copied block by block from the whole shard."""
    import numpy as np

    whole, csr = workdir / "whole", workdir / "csr"
    stamp = (whole / "entries.npy").stat().st_mtime_ns
    marker = csr / "from.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"entries_mtime_ns": stamp}:
        return
    csr.mkdir(exist_ok=True)
    entries = np.load(whole / "entries.npy", mmap_mode="r")
    np.save(csr / "indptr.npy", np.load(whole / "indptr.npy"))
    for name, field in (("indices", "gene"), ("data", "count")):
        out = np.lib.format.open_memmap(csr / f"{name}.npy", "w+", np.int32, (len(entries),))
        for start in range(0, len(entries), 1 << 24):
            out[start : start + (1 << 24)] = entries[field][start : start + (1 << 24)]
        out.flush()
        del out
    marker.write_text(json.dumps({"entries_mtime_ns": stamp}))


def minimal_gather(workdir: Path, reuse: bool):
    """The minimal gather: per batch of sorted cell ids, (offsets, indices, data) copied out of
    one memory-mapped CSR matrix by a compiled loop; into new arrays, or (`reuse`) into one
    buffer kept across batches and sliced."""
    import numba
    import numpy as np

    @numba.njit(nogil=True)
    def spans(indptr, cells, offsets):
        offsets[0] = 0
        for i in range(cells.shape[0]):
            offsets[i + 1] = offsets[i] + indptr[cells[i] + 1] - indptr[cells[i]]

    @numba.njit(nogil=True)
    def copy(indptr, indices, data, cells, offsets, out_indices, out_data):
        for i in range(cells.shape[0]):
            a, lo, hi = indptr[cells[i]], offsets[i], offsets[i + 1]
            out_indices[lo:hi] = indices[a : a + hi - lo]
            out_data[lo:hi] = data[a : a + hi - lo]

    folder = workdir / "csr"
    indptr, indices, data = (
        np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("indptr", "indices", "data")
    )
    buffers = {"indices": np.empty(0, np.int32), "data": np.empty(0, np.int32)}

    def read(cells):
        offsets = np.empty(len(cells) + 1, dtype=np.int64)
        spans(indptr, cells, offsets)
        nnz = int(offsets[-1])
        if not reuse:
            out_indices, out_data = np.empty(nnz, np.int32), np.empty(nnz, np.int32)
        else:
            if len(buffers["indices"]) < nnz:
                buffers["indices"] = np.empty(nnz * 5 // 4, np.int32)
                buffers["data"] = np.empty(nnz * 5 // 4, np.int32)
            out_indices, out_data = buffers["indices"][:nnz], buffers["data"][:nnz]
        copy(indptr, indices, data, cells, offsets, out_indices, out_data)
        return offsets, out_indices, out_data

    return len(indptr) - 1, read


def batches(n_cells: int, batch_size: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    while True:
        yield np.sort(rng.choice(n_cells, batch_size, replace=False))


def measure(loader: str, n_shards: int, workdir: Path, batch_size: int, seconds: float) -> dict:
    """Runs in the child process, under the file-descriptor limit."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
    import numpy as np
    import polars as pl

    start = time.perf_counter()
    if loader in ("minimal", "minimal_reused"):
        n_cells, read = minimal_gather(workdir, reuse=loader == "minimal_reused")
    elif loader == "anndata_backed":
        import anndata as ad

        handles = [ad.read_h5ad(f, backed="r") for f in sorted(workdir.glob("part*.h5ad"))]
        offsets = np.concatenate([[0], np.cumsum([h.n_obs for h in handles])])
        n_cells = int(offsets[-1])

        def read(cells):
            return [
                h.X[cells[(cells >= offsets[i]) & (cells < offsets[i + 1])] - offsets[i]]
                for i, h in enumerate(handles)
            ]
    else:
        from cellfoundry.loader import ShardCollection
        from cellfoundry.vocabulary import from_genes

        manifest = pl.read_parquet(workdir / f"shards_{n_shards}" / "manifest.parquet")
        first = Path(manifest["shard"][0])
        gene_ids = pl.read_parquet(first / "var.parquet")["gene_id"].to_list()
        mapping = from_genes("hsapiens", sorted(gene_ids), None)
        medians = None
        if loader == "rank":
            medians = {
                "hsapiens": pl.DataFrame(
                    {
                        "gene_id": gene_ids,
                        "nonzero_median": np.random.default_rng(0).uniform(0.5, 5, len(gene_ids)),
                    }
                )
            }
        collection = ShardCollection(manifest, {"hsapiens": mapping}, medians=medians)
        n_cells = len(collection)
        if loader == "workers":
            import torch

            class Batches(torch.utils.data.Dataset):
                """Batch k: a seeded random draw of cells, gathered in the worker."""

                def __len__(self) -> int:  # the Dataset protocol; the sampler says which
                    return n_cells

                def __getitem__(self, k: int) -> int:
                    rng = np.random.default_rng([2, k])
                    cells = np.sort(rng.choice(n_cells, batch_size, replace=False))
                    return len(collection.gather(cells))

            # The same two workers serve every phase (each maps the shards it touches once);
            # the batch numbers of a phase are set in the sampler, read at the phase's start.
            plan: list[int] = []
            workers = torch.utils.data.DataLoader(
                Batches(), batch_size=None, sampler=plan, num_workers=2, persistent_workers=True
            )

            def phase(n: int) -> float:
                first = plan[-1] + 1 if plan else 0
                plan[:] = range(first, first + n)
                t0 = time.perf_counter()
                for _ in workers:
                    pass
                return time.perf_counter() - t0

            startup = phase(20)  # workers start and read their first batches
            warm = time.perf_counter()
            while time.perf_counter() - warm < min(seconds, 30):
                per_batch = phase(100) / 100
            n = max(20, int(seconds / per_batch))
            elapsed = phase(n)
            return _result(loader, n_shards, startup, n * batch_size / elapsed, None)

        def read(cells):
            batch = collection.gather(cells)
            return collection.rank_batch(batch, max_len=2048) if loader == "rank" else batch

    stream_cells = batches(n_cells, batch_size, seed=1)
    read(next(stream_cells))
    startup = time.perf_counter() - start
    # Touch the shards (each is mapped on first use), then time the steady state.
    warm = time.perf_counter()
    while time.perf_counter() - warm < min(seconds, 30):
        read(next(stream_cells))
    done, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        read(next(stream_cells))
        done += batch_size
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return _result(loader, n_shards, startup, done / elapsed, done / cpu)


def _result(
    loader: str, n_shards: int, startup: float, cells_per_s: float, cells_per_cpu_s: float | None
) -> dict:
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon"):
            status[key] = int(value.split()[0]) / 1024
    return {
        "loader": loader,
        "shards": n_shards,
        "startup_s": startup,
        "cells_per_s": cells_per_s,
        "cells_per_cpu_s": cells_per_cpu_s,
        "peak_rss_mb": status["VmHWM"],
        "anon_mb": status["RssAnon"],
        "open_fds": len(os.listdir("/proc/self/fd")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000)
    parser.add_argument("--shards", type=int, nargs="+", default=[10, 1_000, 10_000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cellfoundry-bench-loader"))
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        loader, n_shards = args.child
        print(
            json.dumps(measure(loader, int(n_shards), args.workdir, args.batch_size, args.seconds))
        )
        return
    t = time.perf_counter()
    build_corpus(args.workdir, args.cells, args.genes, args.nnz, args.shards)
    build_csr(args.workdir)
    print(
        f"corpus: {args.cells:,} cells x {args.genes:,} genes, ~{args.nnz:,} non-zeros per cell "
        f"(built or reused in {time.perf_counter() - t:.0f} s)\n"
    )
    runs = [("anndata_backed", 3), ("minimal", 1), ("minimal_reused", 1)]
    runs += [("sparse", n) for n in args.shards] + [("rank", n) for n in args.shards]
    runs += [("workers", max(args.shards))]
    rows = []
    for loader, n_shards in runs:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            loader,
            str(n_shards),
            "--workdir",
            str(args.workdir),
            "--batch-size",
            str(args.batch_size),
            "--seconds",
            str(args.seconds),
        ]
        out = subprocess.run(
            cmd, env={**os.environ, **SINGLE_THREAD}, capture_output=True, text=True
        )
        if out.returncode:
            raise RuntimeError(f"{loader} at {n_shards} shards failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done {loader} {n_shards}", file=sys.stderr, flush=True)
    base = rows[0]["cells_per_s"]
    minimal = rows[1]["cells_per_s"]
    labels = {
        "anndata_backed": "anndata backed, sorted fancy index per file (3 h5ad files)",
        "minimal": "minimal gather, one memory-mapped CSR, new arrays per batch",
        "minimal_reused": "minimal gather, one memory-mapped CSR, one reused buffer",
        "sparse": "ShardCollection.gather (tokens, counts, bins)",
        "rank": "gather + Geneformer rank tokens (top 2,048)",
        "workers": "gather in 2 DataLoader worker processes",
    }
    print(f"random batches of {args.batch_size} cells, one core each, ulimit -n {FD_LIMIT}\n")
    print(
        "| loader | shards | start-up (s) | cells/s | cells/CPU-s | peak RSS (MB) | "
        "anonymous RSS (MB) | open fds | vs anndata | vs minimal |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cpu = row["cells_per_cpu_s"]
        print(
            f"| {labels[row['loader']]} | {row['shards']:,} | {row['startup_s']:.2f} | "
            f"{row['cells_per_s']:,.0f} | {'' if cpu is None else f'{cpu:,.0f}'} | "
            f"{row['peak_rss_mb']:,.0f} | {row['anon_mb']:,.0f} | {row['open_fds']} | "
            f"{row['cells_per_s'] / base:.1f}x | {row['cells_per_s'] / minimal:.2f}x |"
        )
    by = {(r["loader"], r["shards"]): r["cells_per_s"] for r in rows}
    small, large = min(args.shards), max(args.shards)
    for loader in ("sparse", "rank"):
        print(
            f"\n{loader}: cells/s at {large:,} shards / at {small:,}: "
            f"{by[(loader, large)] / by[(loader, small)]:.2f}"
        )


if __name__ == "__main__":
    main()
