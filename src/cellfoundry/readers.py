"""Read the single-cell file formats people bring, a block of cells at a time.

`open_source` opens one input of a dataset (see `cellfoundry.sources`) and returns a
`CellReader`: the cells' annotations (`obs`), the counts matrices the file holds (`X`,
`raw.X`, `layers/<name>`), each matrix's feature annotation and its cells in blocks of
`cells x features` CSR matrices. Nothing reads a whole matrix, so memory is O(block + genes)
whatever the file's size (per-cell annotations are held: a few bytes per cell and column).

| format | matrices | how blocks of cells are read |
|---|---|---|
| h5ad (also `.h5ad.gz`, decompressed to a temporary file) | `X`, `raw.X`, `layers/*` | CSR: h5py row slices of `indptr`/`indices`/`data`; dense: h5py row slices; CSC: read whole up to `CSC_IN_MEMORY_NNZ` non-zeros, refused beyond |
| 10x HDF5, Cell Ranger 3+ (`/matrix`) and 2 (`/<genome>`) | `X` | cells are the columns of a CSC matrix, contiguous per cell: slices of `data`/`indices` |
| loom | `X` (`/matrix`), `layers/*` | genes x cells, chunked: column slices of `cells` |
| 10x MTX folder (Cell Ranger 2 `genes.tsv` and 3+ `features.tsv`) | `X` | small files: `scanpy.read_10x_mtx`; larger: the coordinate lines in order of cells |

Every matrix's `var` has the feature IDs or names as index and, when the file says so,
`feature_types` (10x: "Gene Expression", "Antibody Capture", ...) and `genome` columns, so
preprocessing can keep only the gene-expression features of the dataset's species.
"""

from __future__ import annotations

import contextlib
import gzip
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellfoundry.errors import DatasetError
from cellfoundry.sources import SourceFile

# A CSC matrix (genes contiguous) cannot be read by cells without reading all of it; one of up
# to this many non-zeros (~200 MB) is read whole, a larger one is refused with a how-to.
CSC_IN_MEMORY_NNZ = 1 << 24
# An MTX file of up to this many entries is read whole by scanpy; larger ones are streamed.
MTX_IN_MEMORY_NNZ = 1 << 24
# Larger MTX files are parsed this many coordinate lines at a time.
MTX_CHUNK_LINES = 1 << 20
# Dense matrices (loom, dense h5ad X) are read in blocks of at most this many bytes.
DENSE_BLOCK_BYTES = 64 << 20
GENE_EXPRESSION = "Gene Expression"


class CellReader:
    """An opened input: annotations, counts matrices and their cells in blocks.

    Attributes
    ----------
    n_obs
        Cells in the file.
    obs
        Per-cell annotations (index: cell names as in the file, as strings).
    """

    n_obs: int
    obs: pd.DataFrame

    def locations(self) -> list[str]:
        """The counts matrices the file holds: `X`, `raw.X`, `layers/<name>`."""
        raise NotImplementedError

    def var(self, location: str) -> pd.DataFrame:
        """Feature annotation of one matrix (index: feature IDs or names, as strings)."""
        raise NotImplementedError

    def blocks(self, location: str, block_cells: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(first cell, cells x features CSR block) in order; blocks hold `block_cells` cells
        (fewer for the last, and for dense matrices wider than `DENSE_BLOCK_BYTES` allows).
        A block's arrays may be reused for the next block: use or copy them before reading on."""
        raise NotImplementedError

    def stored_entries(self, location: str) -> int:
        """Entries stored for a matrix (non-zeros of a sparse one, all of a dense one): an
        upper bound on its non-zeros, known before reading."""
        raise NotImplementedError

    def organisms(self) -> set[str]:
        """CELLxGENE organism annotations (`organism_ontology_term_id`) of the cells."""
        return set()

    def close(self) -> None:
        """Release the file."""


@contextlib.contextmanager
def open_source(dataset: str, source: SourceFile) -> Iterator[CellReader]:
    """Open one input of a dataset for reading in blocks.

    Raises
    ------
    DatasetError
        When the file cannot be read: truncated, not the format its name says, missing the
        format's fields, or without cells or features.
    """
    with contextlib.ExitStack() as stack:
        try:
            with warnings.catch_warnings():
                # Non-unique symbols are expected in 10x files; genes are keyed by ID later.
                warnings.filterwarnings("ignore", message=".*not unique.*")
                reader = _open(source, stack)
        except DatasetError:
            raise
        except (
            OSError,
            KeyError,
            ValueError,
            TypeError,
            IndexError,
            EOFError,
            zlib.error,
        ) as error:
            # EOFError, zlib.error: a truncated or corrupt `.h5ad.gz`
            raise DatasetError(
                dataset,
                source.path,
                f"cannot be read as {_FORMAT_NAMES[source.format]} (truncated or not a valid "
                f"file?): {error}",
            ) from error
        stack.callback(reader.close)
        if reader.n_obs == 0:
            raise DatasetError(dataset, source.path, "holds no cells")
        yield reader


_FORMAT_NAMES = {"h5ad": "h5ad", "10x": "10x HDF5", "loom": "loom", "mtx": "10x MTX folder"}


def _open(source: SourceFile, stack: contextlib.ExitStack) -> CellReader:
    path = source.path
    if source.format == "h5ad":
        if path.name.lower().endswith(".gz"):
            path = _gunzipped(path, stack)
        return H5adReader(path)
    if source.format == "10x":
        return TenxH5Reader(path)
    if source.format == "loom":
        return LoomReader(path)
    if source.format == "mtx":
        return MtxReader(path)
    raise ValueError(f"unknown format {source.format!r}")


def _gunzipped(path: Path, stack: contextlib.ExitStack) -> Path:
    """Decompress a gzipped file into a temporary folder (HDF5 needs random access)."""
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cellfoundry-")))
    target = folder / path.name[: -len(".gz")]
    with gzip.open(path, "rb") as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, length=16 << 20)
    return target


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "S" or values.dtype == object:
        return np.array(
            [v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object
        )
    return values


def _csr_block(matrix: Any) -> sp.csr_matrix:
    """A block as CSR with sorted indices and no stored zeros."""
    block = sp.csr_matrix(matrix) if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix))
    if not block.has_sorted_indices:
        block.sort_indices()
    if block.nnz and not np.all(block.data != 0):
        block.eliminate_zeros()
    return block


def _dense_block_cells(n_features: int, itemsize: int, block_cells: int) -> int:
    return max(1, min(block_cells, DENSE_BLOCK_BYTES // max(1, n_features * itemsize)))


# --- h5ad -----------------------------------------------------------------------------------


class H5adReader(CellReader):
    """An h5ad file, opened with h5py; elements decoded by anndata's `read_elem`."""

    def __init__(self, path: Path) -> None:
        from anndata.io import read_elem

        self.path = path
        self.file = h5py.File(path, "r")
        self._obs: pd.DataFrame | None = None
        self._matrices: dict[str, Any] = {}
        if "X" in self.file:
            self._matrices["X"] = self.file["X"]
        if "raw" in self.file and "X" in self.file["raw"]:
            self._matrices["raw.X"] = self.file["raw/X"]
        if "layers" in self.file:
            for name, element in self.file["layers"].items():
                self._matrices[f"layers/{name}"] = element
        self.n_obs = self._n_obs()
        for location, element in self._matrices.items():
            if (rows := _shape(element)[0]) != self.n_obs:
                raise ValueError(f"{location} has {rows} rows but obs has {self.n_obs} cells")
        self._uns_organism = None
        if "uns" in self.file and "organism_ontology_term_id" in self.file["uns"]:
            value = read_elem(self.file["uns/organism_ontology_term_id"])
            self._uns_organism = str(value) if np.ndim(value) == 0 else None

    @property
    def obs(self) -> pd.DataFrame:
        """Read when first asked for: `preprocess_file` asks after the counts have streamed,
        as a CELLxGENE file's annotations of millions of cells take hundreds of MB."""
        if self._obs is None:
            from anndata.io import read_elem

            if "obs" in self.file:
                self._obs = _dataframe(read_elem(self.file["obs"]))
            else:
                self._obs = pd.DataFrame(index=pd.RangeIndex(self.n_obs).astype(str))
        return self._obs

    def _obs_group(self) -> h5py.Group | None:
        """obs in anndata's dataframe encoding (a group naming its index dataset), whose
        index and columns can be read one by one; None if obs is absent or older."""
        obs = self.file.get("obs")
        index = obs.attrs.get("_index") if isinstance(obs, h5py.Group) else None
        return obs if isinstance(index, str) and index in obs else None

    def _n_obs(self) -> int:
        if (obs := self._obs_group()) is not None:
            return len(obs[obs.attrs["_index"]])
        if "obs" in self.file:  # an older encoding: read it
            return len(self.obs)
        for element in self._matrices.values():
            return int(_shape(element)[0])
        return 0

    def _obs_column(self, name: str) -> Any:
        """One obs column (None if absent), without reading the others."""
        from anndata.io import read_elem

        if self._obs is None and (obs := self._obs_group()) is not None:
            return read_elem(obs[name]) if name in obs else None
        return self.obs.get(name)

    def locations(self) -> list[str]:
        return list(self._matrices)

    def var(self, location: str) -> pd.DataFrame:
        from anndata.io import read_elem

        key = "raw/var" if location == "raw.X" else "var"
        if key not in self.file:
            n = _shape(self._matrices[location])[1]
            return pd.DataFrame(index=pd.RangeIndex(n).astype(str))
        return _dataframe(read_elem(self.file[key]))

    def blocks(self, location: str, block_cells: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        element = self._matrices[location]
        n_obs, n_vars = _shape(element)
        if isinstance(element, h5py.Dataset):  # dense
            step = _dense_block_cells(n_vars, element.dtype.itemsize, block_cells)
            for start in range(0, n_obs, step):
                yield start, _csr_block(element[start : start + step])
            return
        kind = _sparse_kind(element)
        if kind == "csc":
            yield from self._csc_blocks(location, element, block_cells)
            return
        # Row slices of anndata's CSR encoding read with h5py, as `sparse_dataset` does: its
        # `__getitem__` looks up scipy's version (importlib.metadata) on every call, ~15 ms,
        # which dominated small blocks.
        # Entries are read into two buffers reused from block to block (fresh arrays of tens
        # of MB per block cost as much in page faults as the reading).
        indptr, data, indices = element["indptr"], element["data"], element["indices"]
        buffers = [np.empty(0, dtype=data.dtype), np.empty(0, dtype=indices.dtype)]
        for start in range(0, n_obs, block_cells):
            stop = min(start + block_cells, n_obs)
            offsets = indptr[start : stop + 1].astype(np.int64)
            lo, hi = int(offsets[0]), int(offsets[-1])
            if len(buffers[0]) < hi - lo:
                buffers = [np.empty(hi - lo + (hi - lo) // 4, dtype=b.dtype) for b in buffers]
            for source, buffer in zip((data, indices), buffers, strict=True):
                if hi > lo:
                    source.read_direct(buffer, np.s_[lo:hi], np.s_[: hi - lo])
            block = sp.csr_matrix(
                (buffers[0][: hi - lo], buffers[1][: hi - lo], offsets - lo),
                shape=(stop - start, n_vars),
            )
            yield start, _csr_block(block)

    def stored_entries(self, location: str) -> int:
        element = self._matrices[location]
        if isinstance(element, h5py.Dataset):
            n_obs, n_vars = _shape(element)
            return n_obs * n_vars
        return int(element["data"].shape[0])

    def _csc_blocks(
        self, location: str, element: h5py.Group, block_cells: int
    ) -> Iterator[tuple[int, sp.csr_matrix]]:
        from anndata.io import sparse_dataset

        nnz = int(element["data"].shape[0])
        if nnz > CSC_IN_MEMORY_NNZ:
            raise CscTooLarge(location, nnz)
        matrix = sparse_dataset(element).to_memory().tocsr()
        for start in range(0, matrix.shape[0], block_cells):
            yield start, _csr_block(matrix[start : start + block_cells])

    def organisms(self) -> set[str]:
        found: set[str] = set()
        column = self._obs_column("organism_ontology_term_id")
        if column is not None:
            found |= {str(v) for v in pd.Series(column).dropna().unique()}
        if self._uns_organism:
            found.add(self._uns_organism)
        return found

    def close(self) -> None:
        self.file.close()


class CscTooLarge(ValueError):
    """A CSC matrix too large to read whole (raised while reading blocks)."""

    def __init__(self, location: str, nnz: int) -> None:
        self.location, self.nnz = location, nnz
        super().__init__(
            f"{location} is a CSC matrix (genes stored contiguously) with {nnz:,} non-zeros, "
            "too large to read whole; convert it once to CSR, e.g. "
            "`adata = anndata.read_h5ad(path); adata.X = adata.X.tocsr(); adata.write_h5ad(out)`"
        )


class MtxUnordered(ValueError):
    """A large MTX file whose entries are not in order of cells (raised while reading blocks)."""


def _shape(element: Any) -> tuple[int, int]:
    if isinstance(element, h5py.Dataset):
        return tuple(int(n) for n in element.shape)  # type: ignore[return-value]
    shape = element.attrs.get("shape", element.attrs.get("h5sparse_shape"))
    return int(shape[0]), int(shape[1])


def _sparse_kind(element: h5py.Group) -> str:
    kind = element.attrs.get("encoding-type", element.attrs.get("h5sparse_format", ""))
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    return "csc" if kind.startswith("csc") else "csr"


def _dataframe(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.index = pd.Index(frame.index.astype(str))
    frame.index.name = None
    return frame


# --- 10x Genomics HDF5 ------------------------------------------------------------------------


class TenxH5Reader(CellReader):
    """A Cell Ranger HDF5 matrix: features x barcodes CSC, so each cell is one contiguous slice.

    Cell Ranger 3+ keeps one `/matrix` group with `features/{id,name,feature_type,genome}`;
    Cell Ranger 2 keeps one group per genome (`/<genome>/{genes,gene_names,...}`), side by side
    for multi-genome (barnyard) runs: their features are concatenated, with `genome` set.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = h5py.File(path, "r")
        if "matrix" in self.file:
            self._groups = [self.file["matrix"]]
            features = self.file["matrix/features"]
            var = pd.DataFrame(
                {"gene_name": _decode(features["name"][()])},
                index=pd.Index(_decode(features["id"][()]).astype(str)),
            )
            if "feature_type" in features:
                var["feature_types"] = _decode(features["feature_type"][()])
            if "genome" in features:
                var["genome"] = _decode(features["genome"][()])
            self._var = var
        else:
            self._groups = [g for g in self.file.values() if isinstance(g, h5py.Group)]
            if not self._groups or any("genes" not in g for g in self._groups):
                raise KeyError(
                    "neither /matrix (Cell Ranger 3+) nor /<genome>/genes (Cell Ranger 2)"
                )
            frames = [
                pd.DataFrame(
                    {
                        "gene_name": _decode(g["gene_names"][()]),
                        "feature_types": GENE_EXPRESSION,
                        "genome": g.name.strip("/"),
                    },
                    index=pd.Index(_decode(g["genes"][()]).astype(str)),
                )
                for g in self._groups
            ]
            self._var = pd.concat(frames)
        barcodes = _decode(self._groups[0]["barcodes"][()]).astype(str)
        for group in self._groups[1:]:
            if not np.array_equal(_decode(group["barcodes"][()]).astype(str), barcodes):
                raise ValueError(
                    f"genome groups {group.name} and {self._groups[0].name} list different barcodes"
                )
        self.obs = pd.DataFrame(index=pd.Index(barcodes))
        self.n_obs = len(barcodes)
        self._indptr = [g["indptr"][()] for g in self._groups]
        self._widths = [int(g["shape"][()][0]) for g in self._groups]
        for group, indptr in zip(self._groups, self._indptr, strict=True):
            if len(indptr) != self.n_obs + 1 or int(group["shape"][()][1]) != self.n_obs:
                raise ValueError(f"{group.name}: shape does not match its barcodes")

    def locations(self) -> list[str]:
        return ["X"]

    def var(self, location: str) -> pd.DataFrame:
        return self._var

    def stored_entries(self, location: str) -> int:
        return sum(int(group["data"].shape[0]) for group in self._groups)

    def blocks(self, location: str, block_cells: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        # Datasets opened once: each opening starts an empty chunk cache, and consecutive small
        # blocks would decompress the same chunks again.
        arrays = [(group["data"], group["indices"]) for group in self._groups]
        for start in range(0, self.n_obs, block_cells):
            stop = min(start + block_cells, self.n_obs)
            parts = []
            for (data, indices), indptr, width in zip(
                arrays, self._indptr, self._widths, strict=True
            ):
                lo, hi = int(indptr[start]), int(indptr[stop])
                parts.append(
                    sp.csr_matrix(
                        (
                            data[lo:hi],
                            indices[lo:hi],
                            indptr[start : stop + 1] - lo,
                        ),
                        shape=(stop - start, width),
                    )
                )
            block = parts[0] if len(parts) == 1 else sp.hstack(parts, format="csr")
            yield start, _csr_block(block)

    def close(self) -> None:
        self.file.close()


# --- loom -----------------------------------------------------------------------------------


class LoomReader(CellReader):
    """A loom file (genes x cells `matrix`, `layers/*`, `row_attrs`, `col_attrs`), with h5py.

    `anndata.io.read_loom` needs `loompy` and reads the whole matrix; the layout is four HDF5
    groups, read here by column (cell) blocks.
    """

    GENE_KEYS = ("Gene", "gene_name", "var_names", "Accession", "gene_ids")
    CELL_KEYS = ("CellID", "Cell_id", "obs_names", "cell_id")

    def __init__(self, path: Path) -> None:
        self.path = path
        # A chunk cache that holds a column of chunks (all genes x the chunk's width; loompy
        # writes 64 x 64): blocks narrower than a chunk then decompress each chunk once, not
        # once per block (HDF5's default 1 MiB cache made a one-cell block cost ~50 ms).
        self.file = h5py.File(path, "r", rdcc_nbytes=DENSE_BLOCK_BYTES, rdcc_nslots=100_003)
        matrix = self.file["matrix"]
        n_genes, self.n_obs = (int(n) for n in matrix.shape)
        var = _attrs_frame(self.file.get("row_attrs"), n_genes)
        obs = _attrs_frame(self.file.get("col_attrs"), self.n_obs)
        gene_key = next((k for k in self.GENE_KEYS if k in var), None)
        if gene_key is not None:
            var.index = pd.Index(var[gene_key].astype(str).to_numpy())
            if gene_key in ("Gene", "gene_name", "var_names"):
                var["gene_name"] = var.pop(gene_key).astype(str).to_numpy()
        cell_key = next((k for k in self.CELL_KEYS if k in obs), None)
        if cell_key is not None:
            obs.index = pd.Index(obs.pop(cell_key).astype(str).to_numpy())
        var.index.name = obs.index.name = None
        self._var, self.obs = var, obs
        self._matrices = {"X": matrix}
        for name, layer in self.file.get("layers", {}).items():
            if name:  # loompy's "" layer is the main matrix
                self._matrices[f"layers/{name}"] = layer

    def locations(self) -> list[str]:
        return list(self._matrices)

    def var(self, location: str) -> pd.DataFrame:
        return self._var

    def stored_entries(self, location: str) -> int:
        n_genes, n_cells = self._matrices[location].shape
        return int(n_genes) * int(n_cells)

    def blocks(self, location: str, block_cells: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        matrix = self._matrices[location]
        step = _dense_block_cells(matrix.shape[0], matrix.dtype.itemsize, block_cells)
        for start in range(0, self.n_obs, step):
            yield start, _csr_block(matrix[:, start : start + step].T)

    def close(self) -> None:
        self.file.close()


def _attrs_frame(group: h5py.Group | None, n: int) -> pd.DataFrame:
    columns = {}
    for key, values in (group or {}).items():
        if isinstance(values, h5py.Dataset) and values.ndim == 1 and values.shape[0] == n:
            columns[key] = _decode(values[()])
    return pd.DataFrame(columns, index=pd.RangeIndex(n).astype(str))


# --- 10x MTX folder -------------------------------------------------------------------------


class MtxReader(CellReader):
    """A 10x MTX folder: `matrix.mtx` (features x barcodes coordinates), `barcodes.tsv`, and
    `features.tsv` (Cell Ranger 3+: id, name, feature type) or `genes.tsv` (2: id, name).

    Small matrices are read by `scanpy.read_10x_mtx`; larger ones are streamed through their
    coordinate lines, which Cell Ranger writes in order of cells (an unordered large file is
    refused with a how-to).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.matrix_path = _first_existing(path, ("matrix.mtx.gz", "matrix.mtx"))
        features_path = _first_existing(
            path, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
        )
        barcodes_path = _first_existing(path, ("barcodes.tsv.gz", "barcodes.tsv"))
        features = pd.read_csv(features_path, sep="\t", header=None, dtype=str)
        var = pd.DataFrame(
            {
                "gene_name": features[1].to_numpy()
                if features.shape[1] > 1
                else features[0].to_numpy()
            },
            index=pd.Index(features[0].to_numpy()),
        )
        if features.shape[1] > 2:
            var["feature_types"] = features[2].to_numpy()
        self._var = var
        barcodes = pd.read_csv(barcodes_path, sep="\t", header=None, dtype=str)[0].to_numpy()
        self.obs = pd.DataFrame(index=pd.Index(barcodes))
        self.n_obs = len(barcodes)
        self._header_lines, (rows, cols, self.nnz) = _mtx_header(self.matrix_path)
        if (rows, cols) == (len(var), self.n_obs):
            self.transposed = False  # features x cells, as 10x writes it
        elif (rows, cols) == (self.n_obs, len(var)):
            self.transposed = True  # cells x features, as some GEO submitters write it
        else:
            raise ValueError(
                f"matrix is {rows} x {cols} but there are {len(var)} features and {self.n_obs} barcodes"
            )

    def locations(self) -> list[str]:
        return ["X"]

    def var(self, location: str) -> pd.DataFrame:
        return self._var

    def stored_entries(self, location: str) -> int:
        return self.nnz

    def blocks(self, location: str, block_cells: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        if self.nnz <= MTX_IN_MEMORY_NNZ:
            matrix = self._read_whole()
            for start in range(0, self.n_obs, block_cells):
                yield start, _csr_block(matrix[start : start + block_cells])
            return
        yield from self._stream(block_cells)

    def _read_whole(self) -> sp.csr_matrix:
        import scanpy as sc

        # scanpy reads Cell Ranger 3+ folders only gzipped, as Cell Ranger writes them; plain
        # ones (and Cell Ranger 2, transposed GEO files) are read by scipy.
        gzipped = self.matrix_path.name.endswith(".gz")
        if not self.transposed and "feature_types" in self._var and gzipped:
            adata = sc.read_10x_mtx(
                self.path, var_names="gene_ids", gex_only=False, make_unique=False
            )
            if not np.array_equal(adata.var_names.astype(str), self._var.index.astype(str)):
                raise ValueError("scanpy read the features in another order")
            return sp.csr_matrix(adata.X)
        from scipy.io import mmread

        matrix = sp.csr_matrix(mmread(self.matrix_path))
        return matrix if self.transposed else matrix.T.tocsr()

    def _stream(self, block_cells: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        feature_col, cell_col = (1, 0) if self.transposed else (0, 1)
        n_features = len(self._var)
        pending: list[np.ndarray] = []
        start, last_cell = 0, -1
        reader = pd.read_csv(
            self.matrix_path,
            sep=r"\s+",
            header=None,
            skiprows=self._header_lines,
            names=["a", "b", "v"],
            dtype={"a": np.int64, "b": np.int64, "v": np.float64},
            chunksize=MTX_CHUNK_LINES,
            engine="c",
        )
        for chunk in reader:
            values = chunk.to_numpy()
            cells = values[:, cell_col].astype(np.int64) - 1
            if np.any(np.diff(cells) < 0) or (len(cells) and cells[0] < last_cell):
                raise MtxUnordered(
                    f"matrix.mtx holds {self.nnz:,} entries not ordered by cell; files above "
                    f"{MTX_IN_MEMORY_NNZ:,} entries are read in order of cells: sort the entries "
                    "by barcode or convert the folder to h5ad"
                )
            last_cell = int(cells[-1]) if len(cells) else last_cell
            pending.append(values)
            if last_cell < start + block_cells:
                continue
            stacked = np.concatenate(pending)
            first = stacked[:, cell_col].astype(np.int64) - 1
            offset = 0
            # Cells below the last one seen are complete: the entries come in order of cells.
            while last_cell >= start + block_cells:
                stop = start + block_cells
                cut = int(np.searchsorted(first, stop, side="left"))
                yield (
                    start,
                    self._block(
                        stacked[offset:cut], start, stop, feature_col, cell_col, n_features
                    ),
                )
                offset, start = cut, stop
            pending = [stacked[offset:]]
        stacked = np.concatenate(pending) if pending else np.zeros((0, 3))
        first = stacked[:, cell_col].astype(np.int64) - 1
        offset = 0
        while start < self.n_obs:
            stop = min(start + block_cells, self.n_obs)
            cut = int(np.searchsorted(first, stop, side="left"))
            yield (
                start,
                self._block(stacked[offset:cut], start, stop, feature_col, cell_col, n_features),
            )
            offset, start = cut, stop

    @staticmethod
    def _block(
        entries: np.ndarray, start: int, stop: int, feature_col: int, cell_col: int, n_features: int
    ) -> sp.csr_matrix:
        rows = entries[:, cell_col].astype(np.int64) - 1 - start
        cols = entries[:, feature_col].astype(np.int64) - 1
        coo = sp.coo_matrix((entries[:, 2], (rows, cols)), shape=(stop - start, n_features))
        return _csr_block(coo.tocsr())


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has none of {', '.join(names)}")


def _mtx_header(path: Path) -> tuple[int, tuple[int, int, int]]:
    """Lines before the entries, and the (rows, columns, entries) line of a MatrixMarket file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as handle:
        first = handle.readline()
        if not first.startswith("%%MatrixMarket matrix coordinate"):
            raise ValueError(f"{path.name} is not a MatrixMarket coordinate file")
        if "pattern" in first or "complex" in first:
            raise ValueError(f"{path.name}: {first.strip()} holds no counts")
        lines = 1
        for line in handle:
            lines += 1
            if line.startswith("%") or not line.strip():
                continue
            rows, cols, nnz = (int(x) for x in line.split())
            return lines, (rows, cols, nnz)
    raise ValueError(f"{path.name} has no size line")
