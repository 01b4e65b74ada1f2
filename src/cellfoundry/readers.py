"""Read the single-cell file formats people bring: h5ad, 10x Genomics HDF5, loom.

Every reader returns an `AnnData` with cells as observations, the file's own gene
annotation in `var` and any counts layers or `raw` untouched; finding the raw counts is
the job of `cellfoundry.preprocess`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfoundry.errors import DatasetError

SUFFIXES = {".h5ad": "h5ad", ".h5": "10x", ".hdf5": "10x", ".loom": "loom"}


def file_format(path: str | Path) -> str | None:
    """The format of a file from its suffix (`h5ad`, `10x`, `loom`), None if unsupported."""
    return SUFFIXES.get(Path(path).suffix.lower())


def dataset_files(dataset: str, path: str | Path) -> list[Path]:
    """The files of a dataset: the file itself, or the supported files of a folder, sorted.

    Raises
    ------
    DatasetError
        When the path does not exist, has an unsupported format, holds no supported file, or
        two files of the folder would give the same output name.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and file_format(p))
        if not files:
            raise DatasetError(dataset, path, f"folder holds no {'/'.join(sorted(SUFFIXES))} files")
    elif path.is_file():
        if file_format(path) is None:
            raise DatasetError(
                dataset,
                path,
                f"unsupported format '{path.suffix}' (supported: {', '.join(sorted(SUFFIXES))})",
            )
        files = [path]
    else:
        raise DatasetError(dataset, path, "no such file or folder")
    stems: dict[str, Path] = {}
    for file in files:
        if file.stem in stems:
            raise DatasetError(
                dataset,
                file,
                f"gives the same output name '{file.stem}.h5ad' as {stems[file.stem].name}",
            )
        stems[file.stem] = file
    return files


def read_file(dataset: str, path: str | Path) -> ad.AnnData:
    """Read one file of a dataset into memory.

    Raises
    ------
    DatasetError
        When the file cannot be read: truncated, not HDF5, or missing the format's fields.
    """
    path = Path(path)
    fmt = file_format(path)
    try:
        with warnings.catch_warnings():
            # Non-unique symbols are expected in 10x files; genes are keyed by ID later.
            warnings.filterwarnings("ignore", message=".*not unique.*")
            if fmt == "h5ad":
                adata = ad.read_h5ad(path)
            elif fmt == "10x":
                adata = read_10x_h5(path)
            elif fmt == "loom":
                adata = read_loom(path)
            else:
                raise DatasetError(dataset, path, f"unsupported format '{path.suffix}'")
    except DatasetError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise DatasetError(
            dataset, path, f"cannot be read as {fmt} (truncated or not a valid file?): {error}"
        ) from error
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DatasetError(
            dataset, path, f"holds no data ({adata.n_obs} cells x {adata.n_vars} genes)"
        )
    return adata


def read_10x_h5(path: Path) -> ad.AnnData:
    """A Cell Ranger (v3 or later) HDF5 matrix, gene-expression features only.

    `var_names` are the Ensembl IDs (`features/id`), `var['gene_name']` the symbols; features
    of other types (antibody capture, CRISPR guides) are dropped.
    """
    with h5py.File(path, "r") as handle:
        group = handle["matrix"]
        shape = tuple(int(n) for n in group["shape"][()])  # (features, barcodes)
        matrix = sp.csc_matrix(
            (group["data"][()], group["indices"][()], group["indptr"][()]), shape=shape
        )
        features = group["features"]
        ids = _decode(features["id"][()])
        names = _decode(features["name"][()])
        types = _decode(features["feature_type"][()]) if "feature_type" in features else None
        barcodes = _decode(group["barcodes"][()])
    X = matrix.T.tocsr()  # cells x features
    keep = np.ones(len(ids), dtype=bool) if types is None else types == "Gene Expression"
    var = pd.DataFrame({"gene_name": names[keep]}, index=pd.Index(ids[keep], name=None))
    obs = pd.DataFrame(index=pd.Index(barcodes))
    return ad.AnnData(X=X[:, np.flatnonzero(keep)], obs=obs, var=var)


def read_loom(path: Path) -> ad.AnnData:
    """A loom file (genes x cells `matrix`, `row_attrs`, `col_attrs`), read with h5py alone.

    We read loom directly rather than through `loompy` (which `anndata.read_loom` needs):
    the layout is four HDF5 groups and loompy would be a dependency for this alone.
    """
    with h5py.File(path, "r") as handle:
        X = sp.csr_matrix(np.asarray(handle["matrix"][()]).T)
        var = pd.DataFrame(
            {k: _decode(v[()]) for k, v in handle["row_attrs"].items() if v.ndim == 1}
        )
        obs = pd.DataFrame(
            {k: _decode(v[()]) for k, v in handle["col_attrs"].items() if v.ndim == 1}
        )
    gene_key = next((k for k in ("Gene", "gene_name", "var_names") if k in var), None)
    if gene_key is not None:
        var.index = pd.Index(var.pop(gene_key).astype(str))
        var["gene_name"] = var.index.to_numpy()
    cell_key = next((k for k in ("CellID", "Cell_id", "obs_names") if k in obs), None)
    if cell_key is not None:
        obs.index = pd.Index(obs.pop(cell_key).astype(str))
    else:
        obs.index = pd.Index([str(i) for i in range(X.shape[0])])
    var.index.name = None
    obs.index.name = None
    return ad.AnnData(X=X, obs=obs, var=var)


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "S" or values.dtype == object:
        return np.array(
            [v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object
        )
    return values
