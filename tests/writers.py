"""Writers of the single-cell file layouts people bring, for tests: Cell Ranger 2 and 3+
HDF5 matrices, 10x MTX folders (v2 and v3), looms (velocyto and scanpy style). Each writes the
layout as the tool does (names, dtypes, orientation) from a cells x features count matrix."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array([str(v).encode() for v in values], dtype="S")


def _csc_groups(group: h5py.Group, X: sp.spmatrix, barcodes: Sequence[str]) -> None:
    """features x barcodes CSC arrays, as Cell Ranger stores them (one column per cell)."""
    csc = sp.csr_matrix(X).T.tocsc()  # features x cells; CSC: each cell contiguous
    csc.sort_indices()
    group["data"] = csc.data.astype(np.int32)
    group["indices"] = csc.indices.astype(np.int64)
    group["indptr"] = csc.indptr.astype(np.int64)
    group["shape"] = np.array(csc.shape, dtype=np.int32)
    group["barcodes"] = _strings(barcodes)


def write_10x_v3(
    path: Path,
    X: sp.spmatrix,
    barcodes: Sequence[str],
    ids: Sequence[str],
    names: Sequence[str],
    *,
    feature_types: Sequence[str] | None = None,
    genomes: Sequence[str] | None = None,
) -> Path:
    """A Cell Ranger 3+ feature-barcode HDF5 (`/matrix`, `features/{id,name,feature_type,
    genome}`); X is cells x features."""
    n = len(ids)
    with h5py.File(path, "w") as handle:
        group = handle.create_group("matrix")
        _csc_groups(group, X, barcodes)
        features = group.create_group("features")
        features["id"] = _strings(ids)
        features["name"] = _strings(names)
        features["feature_type"] = _strings(feature_types or ["Gene Expression"] * n)
        features["genome"] = _strings(genomes or ["GRCh38"] * n)
        features["_all_tag_keys"] = _strings(["genome"])
    return path


def write_10x_v2(
    path: Path,
    genomes: dict[str, tuple[sp.spmatrix, Sequence[str], Sequence[str]]],
    barcodes: Sequence[str],
) -> Path:
    """A Cell Ranger 2 HDF5: one group per genome (`/<genome>/{genes,gene_names,barcodes,data,
    indices,indptr,shape}`), each with the same barcodes; values are (cells x genes counts,
    gene IDs, gene names)."""
    with h5py.File(path, "w") as handle:
        for genome, (X, ids, names) in genomes.items():
            group = handle.create_group(genome)
            _csc_groups(group, X, barcodes)
            group["genes"] = _strings(ids)
            group["gene_names"] = _strings(names)
    return path


def write_mtx(
    folder: Path,
    X: sp.spmatrix,
    barcodes: Sequence[str],
    ids: Sequence[str],
    names: Sequence[str],
    *,
    version: int = 3,
    feature_types: Sequence[str] | None = None,
    gzipped: bool | None = None,
    shuffle: np.random.Generator | None = None,
) -> Path:
    """A 10x MTX folder: Cell Ranger 3+ (`features.tsv.gz` with a feature-type column, all
    gzipped) or 2 (`genes.tsv`, plain). Entries are written in order of cells, as Cell Ranger
    does, unless `shuffle` is given."""
    folder.mkdir(parents=True, exist_ok=True)
    gzipped = version >= 3 if gzipped is None else gzipped
    opener = gzip.open if gzipped else open
    suffix = ".gz" if gzipped else ""
    coo = sp.csr_matrix(X).tocoo()  # cells x features, row-major: ordered by cell
    order = np.lexsort((coo.col, coo.row))
    if shuffle is not None:
        order = shuffle.permutation(order)
    lines = [
        "%%MatrixMarket matrix coordinate integer general",
        '%metadata_json: {"software_version": "cellranger-test"}',
        f"{X.shape[1]} {X.shape[0]} {coo.nnz}",
    ]
    lines += [
        f"{c + 1} {r + 1} {int(v)}"
        for r, c, v in zip(coo.row[order], coo.col[order], coo.data[order], strict=True)
    ]
    with opener(folder / f"matrix.mtx{suffix}", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    with opener(folder / f"barcodes.tsv{suffix}", "wt") as handle:
        handle.write("".join(f"{b}\n" for b in barcodes))
    if version >= 3:
        types = feature_types or ["Gene Expression"] * len(ids)
        rows = [f"{i}\t{n}\t{t}\n" for i, n, t in zip(ids, names, types, strict=True)]
        name = "features.tsv"
    else:
        rows = [f"{i}\t{n}\n" for i, n in zip(ids, names, strict=True)]
        name = "genes.tsv"
    with opener(folder / f"{name}{suffix}", "wt") as handle:
        handle.write("".join(rows))
    return folder


def write_loom(
    path: Path,
    matrix: np.ndarray,
    *,
    row_attrs: dict[str, Sequence],
    col_attrs: dict[str, Sequence],
    layers: dict[str, np.ndarray] | None = None,
    chunks: tuple[int, int] = (64, 64),
) -> Path:
    """A loom file (genes x cells `matrix`, `layers/*`, `row_attrs`, `col_attrs`), chunked as
    loompy writes it; `matrix` and layers are given cells x genes and stored transposed."""
    with h5py.File(path, "w") as handle:
        handle.attrs["LOOM_SPEC_VERSION"] = "3.0.0"

        def dataset(where: h5py.Group, name: str, values: np.ndarray) -> None:
            values = np.ascontiguousarray(np.asarray(values).T)
            where.create_dataset(
                name,
                data=values,
                chunks=(min(chunks[0], values.shape[0]), min(chunks[1], values.shape[1])),
                compression="gzip",
            )

        dataset(handle, "matrix", matrix)
        group = handle.create_group("layers")
        for name, values in (layers or {}).items():
            dataset(group, name, values)
        for key, attrs in (("row_attrs", row_attrs), ("col_attrs", col_attrs)):
            group = handle.create_group(key)
            for name, values in attrs.items():
                values = np.asarray(values)
                group[name] = _strings(values) if values.dtype.kind in "OUS" else values
        handle.create_group("row_graphs")
        handle.create_group("col_graphs")
    return path
