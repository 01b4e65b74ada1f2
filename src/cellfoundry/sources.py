"""Which files make up a dataset: a file, a folder of files, 10x MTX folders, Cell Ranger runs.

A dataset's `path` in the sheet names one of:

- a file: `.h5ad` (also gzipped, `.h5ad.gz`), a 10x Genomics HDF5 matrix (`.h5`, `.hdf5`, Cell
  Ranger 2 and 3+ layouts), or a `.loom` file;
- a 10x MTX folder: `matrix.mtx` with `barcodes.tsv` and `features.tsv` (Cell Ranger 3+) or
  `genes.tsv` (Cell Ranger 2), each optionally gzipped;
- a Cell Ranger run: its `outs/` folder (or the folder holding `outs/`). Only the *filtered*
  matrix is read (the HDF5 file when present, else the MTX folder); raw matrices,
  `molecule_info.h5`, BAM files and the rest are listed as ignored. Reading both the filtered
  and the raw matrix would count every cell twice;
- a folder of any of the above, one level deep: each file, MTX folder or Cell Ranger run
  becomes one input of the dataset.

Each input becomes one preprocessed `<name>.h5ad` and one shard, processed by a job of its
own. This module only looks at names (no file is opened), so Snakemake can call it for
thousands of datasets while it plans.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cellfoundry.errors import DatasetError

# Suffixes (lower case) of the file formats, longest first.
FILE_SUFFIXES = {".h5ad.gz": "h5ad", ".h5ad": "h5ad", ".h5": "10x", ".hdf5": "10x", ".loom": "loom"}
MTX_MATRIX = ("matrix.mtx", "matrix.mtx.gz")
# Cell Ranger's filtered matrices, newest layout first: HDF5 (3+, 2), then MTX folders (3+, 2).
CELLRANGER_FILTERED_H5 = ("filtered_feature_bc_matrix.h5", "filtered_gene_bc_matrices_h5.h5")
CELLRANGER_FILTERED_MTX = ("filtered_feature_bc_matrix", "filtered_gene_bc_matrices")
# Output names are paths and shell words: anything else becomes '_'.
UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")


@dataclass(frozen=True)
class SourceFile:
    """One input of a dataset.

    Attributes
    ----------
    name
        Output name: the file's `data/<dataset>/h5ads/<name>.h5ad` and `shards/<dataset>/<name>/`.
    path
        The file, or the MTX folder.
    format
        `h5ad`, `10x` (10x Genomics HDF5), `loom` or `mtx` (10x MTX folder).
    """

    name: str
    path: Path
    format: str


@dataclass(frozen=True)
class DatasetSources:
    """The inputs of a dataset, and what in its folder was deliberately not read."""

    files: tuple[SourceFile, ...]
    ignored: tuple[Path, ...] = ()

    def by_name(self) -> dict[str, SourceFile]:
        return {source.name: source for source in self.files}


def file_format(path: str | Path) -> str | None:
    """The format of a file from its suffix (`h5ad`, `10x`, `loom`), None if unsupported."""
    name = Path(path).name.lower()
    for suffix, fmt in FILE_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


def output_name(path: str | Path) -> str:
    """The output name of an input: its name without the format suffix, made path-safe."""
    name = Path(path).name
    lower = name.lower()
    for suffix in FILE_SUFFIXES:
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return UNSAFE.sub("_", name) or "_"


def is_mtx_folder(path: Path) -> bool:
    """A 10x MTX folder: holds `matrix.mtx` (or `.gz`)."""
    return any((path / name).is_file() for name in MTX_MATRIX)


def _cellranger_outs(path: Path) -> Path | None:
    """The `outs/` folder of a Cell Ranger run at `path` (the run or its outs), else None."""
    for folder in (path / "outs", path):
        if any((folder / name).is_file() for name in CELLRANGER_FILTERED_H5) or any(
            (folder / name).is_dir() for name in CELLRANGER_FILTERED_MTX
        ):
            return folder
    return None


def _filtered_matrix(outs: Path) -> tuple[Path, str]:
    """The filtered matrix of a Cell Ranger `outs/` folder: HDF5 first, else the MTX folder."""
    for name in CELLRANGER_FILTERED_H5:
        if (outs / name).is_file():
            return outs / name, "10x"
    for name in CELLRANGER_FILTERED_MTX:
        folder = outs / name
        if folder.is_dir():
            if is_mtx_folder(folder):
                return folder, "mtx"
            # Cell Ranger 2: filtered_gene_bc_matrices/<genome>/matrix.mtx
            genomes = sorted(p for p in folder.iterdir() if p.is_dir() and is_mtx_folder(p))
            if genomes:
                return genomes[0], "mtx"
    raise FileNotFoundError(outs)


def _everything_under(folder: Path, keep: set[Path]) -> list[Path]:
    """Files and folders directly in `folder` other than those kept (reported as ignored)."""
    return sorted(p for p in folder.iterdir() if p not in keep and not p.name.startswith("."))


def dataset_sources(
    dataset: str, path: str | Path, *, planned: Iterable[str | Path] = ()
) -> DatasetSources:
    """The inputs of a dataset (see the module docstring for the layouts recognised).

    `planned` are files a workflow rule will write (the demo corpus): a dataset path that does
    not exist yet is the file among them, or the folder of those under it.

    Raises
    ------
    DatasetError
        When the path does not exist, is not a supported format, holds no supported input, or
        two inputs would get the same output name.
    """
    path = Path(path)
    files: list[SourceFile] = []
    ignored: list[Path] = []
    planned = [Path(p) for p in planned]
    if not path.exists() and (path in planned or any(path in p.parents for p in planned)):
        files += [
            SourceFile(output_name(p), p, file_format(p))
            for p in planned
            if (p == path or path in p.parents) and file_format(p)
        ]
    elif path.is_file():
        fmt = file_format(path)
        if fmt is None:
            raise DatasetError(
                dataset,
                path,
                f"unsupported format (supported: {', '.join(FILE_SUFFIXES)}, a 10x MTX folder "
                "or a Cell Ranger outs/ folder)",
            )
        files.append(SourceFile(output_name(path), path, fmt))
    elif path.is_dir():
        _collect_folder(path, files, ignored, top=True)
        if not files:
            raise DatasetError(
                dataset,
                path,
                f"folder holds no {', '.join(FILE_SUFFIXES)} file, 10x MTX folder or Cell "
                "Ranger outs/ folder",
            )
    else:
        raise DatasetError(dataset, path, "no such file or folder")
    seen: dict[str, SourceFile] = {}
    for source in files:
        if source.name in seen:
            raise DatasetError(
                dataset,
                source.path,
                f"gives the same output name '{source.name}.h5ad' as {seen[source.name].path}",
            )
        seen[source.name] = source
    return DatasetSources(tuple(sorted(files, key=lambda s: s.name)), tuple(ignored))


def _collect_folder(
    folder: Path, files: list[SourceFile], ignored: list[Path], *, top: bool
) -> None:
    if is_mtx_folder(folder):
        files.append(SourceFile(output_name(folder), folder, "mtx"))
        return
    outs = _cellranger_outs(folder)
    if outs is not None:
        matrix, fmt = _filtered_matrix(outs)
        # The run's name: the folder holding outs/ (or outs' parent when given outs/ itself).
        run = outs.parent if outs.name == "outs" else outs
        name = output_name(run) if not top else output_name(matrix)
        files.append(SourceFile(name, matrix, fmt))
        keep = {matrix, matrix.parent} if fmt == "mtx" else {matrix}
        ignored += _everything_under(outs, keep)
        if outs != folder:
            ignored += _everything_under(folder, {outs})
        return
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and file_format(entry):
            files.append(SourceFile(output_name(entry), entry, file_format(entry)))
        elif entry.is_dir() and top and (is_mtx_folder(entry) or _cellranger_outs(entry)):
            _collect_folder(entry, files, ignored, top=False)
        else:
            ignored.append(entry)
