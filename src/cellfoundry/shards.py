"""Stage 6: training shards, one per preprocessed file, memory-mappable.

A shard is a folder of plain `.npy` arrays (readable by `numpy.load(mmap_mode='r')` from any
language with an npy reader) describing a CSR matrix over the dataset's OWN gene list:

- `indptr.npy` (int64, cells + 1): row offsets,
- `indices.npy` (int32, nnz): positions of expressed genes in `var.parquet`, ascending per cell,
- `counts.npy` (int32, nnz): raw counts,
- `bins.npy` (uint8, nnz): scGPT-style per-cell quantile bins of the counts (1..n_bins-1;
  0 is reserved for zero),
- `total_counts.npy` (float64, cells): each cell's total count over all its genes,
- `var.parquet` (gene_id, gene_name), `obs.parquet` (cell annotations), `shard.json`.

Token ids and Geneformer medians are corpus-level, so they are not in shards; the loader
(`cellfoundry.loader`) applies them when it reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp

from cellfoundry.discretize import quantile_bins
from cellfoundry.errors import DatasetError
from cellfoundry.io import atomic_outputs, read_json, sha256, write_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAYS = ("indptr", "indices", "counts", "bins", "total_counts")
MANIFEST = "manifest.json"


def write_shard(
    adata: ad.AnnData, out_dir: Path, *, n_bins: int, meta: dict[str, Any]
) -> dict[str, Any]:
    """Write one shard of a preprocessed AnnData (raw integer counts in X)."""
    X = sp.csr_matrix(adata.X)
    X.sort_indices()
    if X.data.size and X.data.min() <= 0:
        X.eliminate_zeros()
    counts = X.data.astype(np.int32, copy=False)
    bins = quantile_bins(X, n_bins, tie_break="highest")
    if "total_counts" in adata.obs:
        total = adata.obs["total_counts"].to_numpy(dtype=np.float64)
    else:
        total = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    out_dir.mkdir(parents=True)
    arrays = {
        "indptr": X.indptr.astype(np.int64),
        "indices": X.indices.astype(np.int32),
        "counts": counts,
        "bins": bins.astype(np.uint8),
        "total_counts": total,
    }
    for name, array in arrays.items():
        np.save(out_dir / f"{name}.npy", np.ascontiguousarray(array))
    gene_names = (
        adata.var["gene_name"].astype(str).to_list()
        if "gene_name" in adata.var
        else [""] * adata.n_vars
    )
    pl.DataFrame(
        {"gene_id": adata.var_names.astype(str).to_list(), "gene_name": gene_names}
    ).write_parquet(out_dir / "var.parquet", statistics=False)
    _obs_frame(adata.obs).write_parquet(out_dir / "obs.parquet", statistics=False)
    info = {
        **meta,
        "n_cells": int(X.shape[0]),
        "n_genes": int(X.shape[1]),
        "nnz": int(X.nnz),
        "n_bins": int(n_bins),
        "format_version": FORMAT_VERSION,
    }
    write_json(out_dir / "shard.json", info)
    return info


def _obs_frame(obs: pd.DataFrame) -> pl.DataFrame:
    columns: dict[str, Any] = {"obs_name": obs.index.astype(str).to_list()}
    for column in obs.columns:
        series = obs[column]
        if series.dtype.kind in "iufb":
            columns[str(column)] = series.to_numpy()
        else:
            columns[str(column)] = series.astype(str).to_list()
    return pl.DataFrame(columns)


def write_dataset_shards(
    dataset: str, species: str, h5ad_dir: str | Path, out_dir: str | Path, *, n_bins: int
) -> dict[str, Any]:
    """Write the shards of every preprocessed file of a dataset, plus its manifest, atomically."""
    h5ad_dir = Path(h5ad_dir)
    files = sorted(h5ad_dir.glob("*.h5ad"))
    if not files:
        raise DatasetError(dataset, h5ad_dir, "no preprocessed .h5ad files")
    with atomic_outputs(out_dir) as (staging,):
        staging.mkdir()
        entries = []
        for file in files:
            adata = ad.read_h5ad(file)
            meta = {
                "dataset": dataset,
                "species": species,
                "file": file.name,
                "h5ad_sha256": sha256(file),
            }
            info = write_shard(adata, staging / file.stem, n_bins=n_bins, meta=meta)
            log.info(
                "%s: shard %s: %d cells, %d non-zeros",
                dataset,
                file.stem,
                info["n_cells"],
                info["nnz"],
            )
            entries.append(
                {
                    "file": file.name,
                    "shard": file.stem,
                    **{k: info[k] for k in ("n_cells", "n_genes", "nnz")},
                }
            )
        manifest = {
            "dataset": dataset,
            "species": species,
            "n_bins": n_bins,
            "format_version": FORMAT_VERSION,
            "shards": entries,
        }
        write_json(staging / MANIFEST, manifest)
    return manifest


def shard_folders(root: str | Path) -> list[Path]:
    """The shard folders of one dataset (`shards/<dataset>`), in its manifest's order."""
    manifest = read_json(Path(root) / MANIFEST)
    return [Path(root) / entry["shard"] for entry in manifest["shards"]]


def shard_manifest(splits: pl.DataFrame, shard_roots: dict[str, Path]) -> pl.DataFrame:
    """Join the split manifest with the per-dataset shard manifests: one row per (split, file).

    Columns: split, dataset, species, file, shard (folder), n_cells, n_genes, nnz.
    """
    rows = []
    for root in sorted(shard_roots.values()):
        manifest = read_json(Path(root) / MANIFEST)
        for entry in manifest["shards"]:
            rows.append(
                {
                    "dataset": manifest["dataset"],
                    "species": manifest["species"],
                    "file": entry["file"],
                    "shard": str(Path(root) / entry["shard"]),
                    "n_cells": entry["n_cells"],
                    "n_genes": entry["n_genes"],
                    "nnz": entry["nnz"],
                }
            )
    shards = pl.DataFrame(
        rows,
        schema={
            "dataset": pl.Utf8,
            "species": pl.Utf8,
            "file": pl.Utf8,
            "shard": pl.Utf8,
            "n_cells": pl.Int64,
            "n_genes": pl.Int64,
            "nnz": pl.Int64,
        },
    )
    joined = splits.rename({"source_name": "dataset"}).join(
        shards, on=["dataset", "species", "file"], how="left"
    )
    missing = joined.filter(pl.col("shard").is_null())
    if missing.height:
        first = missing.row(0, named=True)
        raise DatasetError(first["dataset"], first["file"], "is listed in a split but has no shard")
    return joined.select(
        "split", "dataset", "species", "file", "shard", "n_cells", "n_genes", "nnz"
    ).sort("split", "dataset", "file")
