"""Stage 6: training shards, one per preprocessed file, memory-mappable.

A shard is a folder of plain `.npy` arrays (readable by `numpy.load(mmap_mode='r')` from any
language with an npy reader) describing a CSR matrix over the file's OWN gene list:

- `indptr.npy` (int64, cells + 1): where each cell's entries start and stop,
- `entries.npy` (packed records, 9 bytes, nnz): `gene` (int32, position in `var.parquet`),
  `count` (int32, raw count) and `bin` (uint8, scGPT-style per-cell quantile bin of the count,
  1..n_bins-1; 0 is reserved for zero). One record per expressed gene keeps a cell's data in
  one contiguous stretch: a random cell costs one read, and a shard one memory map;
- `total_counts.npy` (float64, cells): each cell's total count (the denominator of
  Geneformer's normalization),
- `var.parquet` (gene_id, gene_name), `obs.parquet` (cell annotations), `shard.json`.

The preprocessing job writes the shard in the same streaming pass as the file's h5ad
(`ShardWriter`), so each input is read once. Token ids and Geneformer medians are
corpus-level, so they are not in shards; the loader (`cellfoundry.loader`) applies them.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp

from cellfoundry.discretize import quantile_bins_csr
from cellfoundry.errors import DatasetError
from cellfoundry.formats import SHARDS as FORMAT_VERSION
from cellfoundry.io import atomic_outputs, read_json, write_json

log = logging.getLogger(__name__)

ENTRY = np.dtype([("gene", "<i4"), ("count", "<i4"), ("bin", "u1")])  # packed: 9 bytes
ARRAYS = ("indptr", "entries", "total_counts")
MANIFEST = "manifest.json"
# Bytes reserved for an appended .npy file's header (rewritten in place once the length is known).
_NPY_HEADER = 128


class NpyAppender:
    """A 1-d `.npy` file written by appending blocks; its header is completed on `close`.

    The bytes depend only on the concatenated data, not on how it was split into blocks.
    """

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.handle.write(self._header(0))

    def _header(self, length: int) -> bytes:
        descr = np.lib.format.dtype_to_descr(self.dtype)
        text = repr({"descr": descr, "fortran_order": False, "shape": (length,)})
        prefix = b"\x93NUMPY\x01\x00"
        body = text.encode("latin1")
        pad = _NPY_HEADER - len(prefix) - 2 - len(body) - 1
        if pad < 0:
            raise ValueError(f"npy header too long for {self.path}")
        header = body + b" " * pad + b"\n"
        return prefix + len(header).to_bytes(2, "little") + header

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        array.tofile(self.handle)
        self.length += len(array)

    def close(self) -> None:
        self.handle.seek(0)
        self.handle.write(self._header(self.length))
        self.handle.close()


class ShardWriter:
    """Write a shard cell block by cell block (see the module docstring for the layout).

    Parameters
    ----------
    folder
        The shard folder to create (it must not exist).
    n_bins
        Quantile bins per cell including the zero bin (recorded in `shard.json`).
    """

    def __init__(self, folder: Path, *, n_bins: int) -> None:
        folder.mkdir(parents=True)
        self.folder, self.n_bins = folder, n_bins
        self.indptr = NpyAppender(folder / "indptr.npy", np.int64)
        self.entries = NpyAppender(folder / "entries.npy", ENTRY)
        self.total_counts = NpyAppender(folder / "total_counts.npy", np.float64)
        self.indptr.append(np.zeros(1, dtype=np.int64))
        self.n_cells = 0
        self.nnz = 0
        self._records = np.empty(0, dtype=ENTRY)  # reused from block to block

    def append(
        self,
        indptr: np.ndarray,
        genes: np.ndarray,
        counts: np.ndarray,
        bins: np.ndarray,
        total_counts: np.ndarray,
    ) -> None:
        """Append a block of cells: CSR arrays over the file's genes (`indptr` of the block,
        starting at 0), each entry's count and bin, and each cell's total count."""
        if len(self._records) < len(genes):
            self._records = np.empty(len(genes) + len(genes) // 4, dtype=ENTRY)
        records = self._records[: len(genes)]
        records["gene"], records["count"], records["bin"] = genes, counts, bins
        self.entries.append(records)
        self.indptr.append(np.asarray(indptr[1:], dtype=np.int64) + self.nnz)
        self.total_counts.append(total_counts)
        self.n_cells += len(indptr) - 1
        self.nnz += len(genes)

    def close(self, var: pd.DataFrame, obs: pd.DataFrame, meta: dict[str, Any]) -> dict[str, Any]:
        """Finish the arrays and write `var.parquet`, `obs.parquet` and `shard.json`.

        `var` has the Ensembl IDs as index and `gene_name`; `obs` one row per cell written.
        """
        for appender in (self.indptr, self.entries, self.total_counts):
            appender.close()
        gene_names = (
            var["gene_name"].astype(str).to_list() if "gene_name" in var else [""] * len(var)
        )
        pl.DataFrame(
            {"gene_id": var.index.astype(str).to_list(), "gene_name": gene_names}
        ).write_parquet(self.folder / "var.parquet", statistics=False)
        obs_frame(obs).write_parquet(self.folder / "obs.parquet", statistics=False)
        info = {
            **meta,
            "genes_sha256": genes_sha256(var.index),
            "n_cells": self.n_cells,
            "n_genes": len(var),
            "nnz": self.nnz,
            "n_bins": self.n_bins,
            "format_version": FORMAT_VERSION,
        }
        write_json(self.folder / "shard.json", info)
        return info


def genes_sha256(gene_ids: Any) -> str:
    """Identity of a gene list (order matters): SHA-256 of the IDs joined by newlines."""
    return hashlib.sha256("\n".join(map(str, gene_ids)).encode()).hexdigest()


def write_shard(
    adata: ad.AnnData,
    folder: Path,
    *,
    n_bins: int,
    meta: dict[str, Any],
    seed: int = 0,
    tie_break: str = "random",
    block_cells: int = 4096,
) -> dict[str, Any]:
    """Write the shard of an in-memory AnnData of raw integer counts (cells x genes, Ensembl IDs
    as `var_names`); `obs['total_counts']` is used when present, else the row sums. Bins break
    ties as `discretize.quantile_bins_csr` does, from `seed` and each cell's position."""
    X = sp.csr_matrix(adata.X)
    # Files written by other tools may mix int32 indices with an int64 indptr.
    X = sp.csr_matrix(
        (X.data, X.indices.astype(np.int64), X.indptr.astype(np.int64)), shape=X.shape
    )
    X.sort_indices()
    X.eliminate_zeros()
    if "total_counts" in adata.obs:
        total = adata.obs["total_counts"].to_numpy(dtype=np.float64)
    else:
        total = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    writer = ShardWriter(folder, n_bins=n_bins)
    for start in range(0, X.shape[0], block_cells):
        block = X[start : start + block_cells]
        bins = quantile_bins_csr(
            block.indptr, block.data, n_bins, seed=seed, cell_offset=start, tie_break=tie_break
        )
        writer.append(
            block.indptr, block.indices, block.data, bins, total[start : start + block_cells]
        )
    return writer.close(adata.var, adata.obs, meta)


def obs_frame(obs: pd.DataFrame) -> pl.DataFrame:
    """Cell annotations as a polars table: `obs_name`, then each column; missing stays null."""
    columns: dict[str, Any] = {
        "obs_name": pl.Series(obs.index.astype(str).to_list(), dtype=pl.Utf8)
    }
    for column in obs.columns:
        series = obs[column]
        if isinstance(series.dtype, pd.CategoricalDtype):
            values = series.astype(object).where(series.notna(), None).to_list()
            columns[str(column)] = pl.Series(
                [None if v is None else str(v) for v in values], dtype=pl.Utf8
            )
        else:
            columns[str(column)] = pl.from_pandas(series)
    return pl.DataFrame(columns)


def read_entries(folder: str | Path) -> np.ndarray:
    """The `entries.npy` records of a shard, memory-mapped."""
    return np.load(Path(folder) / "entries.npy", mmap_mode="r")


def write_dataset_manifest(
    dataset: str, species: str, shard_folders: list[Path], out: str | Path
) -> dict[str, Any]:
    """`shards/<dataset>/manifest.json`: the dataset's shards, from their `shard.json` files.

    Raises
    ------
    DatasetError
        When a shard was written with another format version or number of bins than the others.
    """
    entries = []
    n_bins = None
    for folder in sorted(shard_folders, key=lambda p: p.name):
        info = read_json(folder / "shard.json")
        if info.get("format_version") != FORMAT_VERSION:
            raise DatasetError(
                dataset,
                folder,
                f"shard format {info.get('format_version')}, expected {FORMAT_VERSION}; rerun its preprocessing",
            )
        if n_bins is not None and info["n_bins"] != n_bins:
            raise DatasetError(dataset, folder, f"has {info['n_bins']} bins, other shards {n_bins}")
        n_bins = info["n_bins"]
        entries.append(
            {
                "file": info["file"],
                "shard": folder.name,
                **{k: info[k] for k in ("n_cells", "n_genes", "nnz", "genes_sha256")},
            }
        )
    manifest = {
        "dataset": dataset,
        "species": species,
        "n_bins": n_bins,
        "format_version": FORMAT_VERSION,
        "shards": entries,
    }
    with atomic_outputs(out) as (staging,):
        write_json(staging, manifest)
    return manifest


def shard_folders(root: str | Path) -> list[Path]:
    """The shard folders of one dataset (`shards/<dataset>`), in its manifest's order."""
    manifest = read_json(Path(root) / MANIFEST)
    return [Path(root) / entry["shard"] for entry in manifest["shards"]]


MANIFEST_SCHEMA = {
    "split": pl.Utf8,
    "dataset": pl.Utf8,
    "species": pl.Utf8,
    "file": pl.Utf8,
    "shard": pl.Utf8,
    "n_cells": pl.Int64,
    "n_genes": pl.Int64,
    "nnz": pl.Int64,
    "n_bins": pl.Int64,
    "genes_sha256": pl.Utf8,
    "cells": pl.Utf8,
    "holdout": pl.List(pl.Int64),
}


def shard_manifest(
    splits: pl.DataFrame, manifests: list[Path], *, holdout: pl.DataFrame | None = None
) -> pl.DataFrame:
    """The one manifest training reads: a row per (split, file) with its shard.

    `manifests` are `shards/<dataset>/manifest.json` files; `holdout` lists cells held out by
    the default split (`splits.holdout_cells`): a training row of such a file takes the other
    cells (`cells` = "rest") and a validation row is added with the held-out ones ("holdout");
    other rows take all cells ("all"). Columns: `MANIFEST_SCHEMA`; `n_cells` counts the
    row's cells, `genes_sha256` identifies the shard's gene list (equal lists share one token
    lookup in the loader).
    """
    rows = []
    for path in sorted(manifests):
        manifest = read_json(path)
        for entry in manifest["shards"]:
            rows.append(
                {
                    "dataset": manifest["dataset"],
                    "species": manifest["species"],
                    "file": entry["file"],
                    "shard": str(Path(path).parent / entry["shard"]),
                    "n_cells": entry["n_cells"],
                    "n_genes": entry["n_genes"],
                    "nnz": entry["nnz"],
                    "n_bins": manifest["n_bins"],
                    "genes_sha256": entry["genes_sha256"],
                }
            )
    columns = [
        "dataset",
        "species",
        "file",
        "shard",
        "n_cells",
        "n_genes",
        "nnz",
        "n_bins",
        "genes_sha256",
    ]
    shards = pl.DataFrame(rows, schema={k: MANIFEST_SCHEMA[k] for k in columns})
    joined = splits.rename({"source_name": "dataset"}).join(
        shards, on=["dataset", "species", "file"], how="left"
    )
    missing = joined.filter(pl.col("shard").is_null())
    if missing.height:
        first = missing.row(0, named=True)
        raise DatasetError(first["dataset"], first["file"], "is listed in a split but has no shard")
    joined = joined.with_columns(
        pl.lit("all").alias("cells"), pl.lit(None, dtype=pl.List(pl.Int64)).alias("holdout")
    )
    if holdout is not None and holdout.height:
        held = holdout.group_by("dataset", "file").agg(pl.col("cell").sort().alias("held"))
        train = joined.filter(pl.col("split") == "train").join(
            held, on=["dataset", "file"], how="left"
        )
        has = pl.col("held").is_not_null() & (pl.col("held").list.len() > 0)
        rest = train.with_columns(
            pl.when(has).then(pl.lit("rest")).otherwise(pl.lit("all")).alias("cells"),
            pl.when(has).then(pl.col("held")).otherwise(None).alias("holdout"),
            (pl.col("n_cells") - pl.col("held").list.len().fill_null(0)).alias("n_cells"),
        )
        val = train.filter(has).with_columns(
            pl.lit("val").alias("split"),
            pl.lit("holdout").alias("cells"),
            pl.col("held").alias("holdout"),
            pl.col("held").list.len().cast(pl.Int64).alias("n_cells"),
        )
        joined = pl.concat(
            [
                joined.filter(pl.col("split") != "train"),
                rest.drop("held").filter(pl.col("n_cells") > 0),
                val.drop("held"),
            ],
            how="diagonal",
        )
    return (
        joined.select(list(MANIFEST_SCHEMA)).cast(MANIFEST_SCHEMA).sort("split", "dataset", "file")
    )
