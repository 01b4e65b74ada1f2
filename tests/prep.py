"""Running the per-file preprocessing and the dataset aggregation in tests."""

from __future__ import annotations

from pathlib import Path

from cellfoundry.gene_stats import EXACT_MAX_CELLS
from cellfoundry.preprocess import (
    BLOCK_CELLS,
    DatasetOutputs,
    FileOutputs,
    PreprocessSettings,
    aggregate_dataset,
    preprocess_file,
)
from cellfoundry.reference import GeneReference
from cellfoundry.sources import SourceFile, dataset_sources

# Thresholds that keep the cells of small synthetic files.
LOOSE = PreprocessSettings(min_genes=10, min_counts=50, max_mito_fraction=0.5)


def file_outputs(root: Path, name: str, dataset: str = "ds") -> FileOutputs:
    """The outputs of one input as the workflow lays them out (qc and cells side by side)."""
    return FileOutputs(
        root / "data" / dataset / "h5ads" / f"{name}.h5ad",
        root / "shards" / dataset / name,
        root / "stats" / "files" / dataset / f"{name}.parquet",
        root / "qc" / dataset / "files" / f"{name}.json",
        root / "qc" / dataset / "files" / f"{name}.cells.parquet",
    )


def preprocess_source(
    source: SourceFile,
    reference: GeneReference,
    root: Path,
    settings: PreprocessSettings = LOOSE,
    *,
    dataset: str = "ds",
    species: str = "hsapiens",
    block_cells: int = BLOCK_CELLS,
    n_bins: int = 11,
    exact_max_cells: int = EXACT_MAX_CELLS,
    seed: int = 0,
    tie_break: str = "random",
) -> tuple[dict, FileOutputs]:
    """Preprocess one input into `root`; returns its QC record and where its outputs are."""
    outputs = file_outputs(root, source.name, dataset)
    qc = preprocess_file(
        dataset,
        species,
        source,
        reference,
        settings,
        outputs,
        n_bins=n_bins,
        block_cells=block_cells,
        exact_max_cells=exact_max_cells,
        seed=seed,
        tie_break=tie_break,
    )
    return qc, outputs


def preprocess_path(
    path: Path, reference: GeneReference, root: Path, settings: PreprocessSettings = LOOSE, **kw
) -> tuple[dict, FileOutputs]:
    """Preprocess a dataset path that holds exactly one input."""
    (source,) = dataset_sources(kw.get("dataset", "ds"), path).files
    return preprocess_source(source, reference, root, settings, **kw)


def preprocess_dataset(
    path: Path,
    reference: GeneReference,
    root: Path,
    settings: PreprocessSettings = LOOSE,
    *,
    dataset: str = "ds",
    species: str = "hsapiens",
    **kw,
) -> tuple[dict, list[FileOutputs], DatasetOutputs]:
    """Every input of a dataset, then its aggregation, as the workflow runs them."""
    files = [
        preprocess_source(s, reference, root, settings, dataset=dataset, species=species, **kw)[1]
        for s in dataset_sources(dataset, path).files
    ]
    outputs = DatasetOutputs(
        root / "stats" / "datasets" / f"{dataset}.parquet",
        root / "qc" / dataset / "qc.json",
        root / "qc" / dataset / "qc.png",
        root / "provenance" / f"{dataset}.json",
        root / "shards" / dataset / "manifest.json",
    )
    qc = aggregate_dataset(
        dataset,
        species,
        path,
        [f.qc for f in files],
        [f.gene_stats for f in files],
        [f.shard for f in files],
        settings,
        outputs,
        reference_source=reference.source,
    )
    return qc, files, outputs


def output_bytes(outputs: FileOutputs) -> dict[str, bytes]:
    """Every file a preprocessing wrote, by name (the shard's files included)."""
    found = {
        name: getattr(outputs, name).read_bytes() for name in ("h5ad", "gene_stats", "qc", "cells")
    }
    for path in sorted(outputs.shard.iterdir()):
        found[f"shard/{path.name}"] = path.read_bytes()
    return found
