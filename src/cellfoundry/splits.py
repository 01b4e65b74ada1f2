"""Stage 5: expand scConcept split files into one manifest of concrete files.

A split file describes one source of data (see `formats.md`)::

    source_name: cxg_raw_2023-12-15
    species: hsapiens
    source_path: ${PATH.PROJECT_PATH}/data/${.source_name}/h5ads
    train: [a.h5ad, b.h5ad]
    val: []

`source_path` is an OmegaConf interpolation: `${PATH.PROJECT_PATH}` is the project directory,
`${.source_name}` a sibling key. The config lists, for the train and the val loaders, split
names or `{source: <split>, key: train|val}` items that pick the other section. Expansion
gives one row per file and loader: split, source_name, species, file, path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import polars as pl
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cellfoundry.errors import ConfigError
from cellfoundry.seeds import derive_seed

FORMAT_VERSION = 1
SECTIONS = ("train", "val")
SOURCE_PATH = "${PATH.PROJECT_PATH}/data/${.source_name}/h5ads"
MANIFEST_SCHEMA = {
    "split": pl.Utf8,
    "source_name": pl.Utf8,
    "species": pl.Utf8,
    "file": pl.Utf8,
    "path": pl.Utf8,
}


@dataclass(frozen=True)
class SplitFile:
    """One resolved split file."""

    name: str
    source_name: str
    species: str
    source_path: str
    sections: dict[str, list[str]] = field(default_factory=dict)
    origin: str = ""

    def files(self, section: str) -> list[str]:
        return list(self.sections.get(section) or [])


def load_split_file(path: str | Path, project_path: str) -> SplitFile:
    """Read and resolve one scConcept split file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"split file {path}: cannot be read: {error}") from error
    return resolve_split(path.stem, raw, project_path, origin=str(path))


def resolve_split(name: str, raw: Any, project_path: str, *, origin: str = "") -> SplitFile:
    """Resolve the interpolations of a split given as a mapping."""
    where = origin or name
    if not isinstance(raw, dict):
        raise ConfigError(
            f"split file {where}: expected a mapping with source_name, species, source_path"
        )
    for key in ("source_name", "species", "source_path"):
        if key not in raw:
            raise ConfigError(f"split file {where}: missing key '{key}'")
    unknown = set(raw) - {"source_name", "species", "source_path", *SECTIONS}
    if unknown:
        raise ConfigError(f"split file {where}: unknown key(s) {', '.join(sorted(unknown))}")
    root = OmegaConf.create({"PATH": {"PROJECT_PATH": project_path}, "split": raw})
    try:
        resolved = OmegaConf.to_container(root.split, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"split file {where}: cannot resolve interpolation: {error}") from error
    sections = {}
    for section in SECTIONS:
        files = resolved.get(section) or []
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ConfigError(f"split file {where}: '{section}' must be a list of file names")
        sections[section] = files
    return SplitFile(
        name,
        str(resolved["source_name"]),
        str(resolved["species"]),
        str(resolved["source_path"]),
        sections,
        where,
    )


def expand(
    loaders: dict[str, list[str | dict[str, str]]],
    splits: dict[str, SplitFile],
    *,
    datasets: dict[str, str] | None = None,
    check_files: bool = True,
) -> pl.DataFrame:
    """One row per (loader, file): the concrete files each loader reads.

    Parameters
    ----------
    loaders
        For `train` and `val`: lists of split names, or `{source, key}` items.
    splits
        Split files by name.
    datasets
        Dataset name -> species of the dataset sheet; a split whose source is not a dataset of
        the sheet, or whose species differs, is an error (the pipeline makes shards only for
        the sheet's datasets).
    check_files
        Fail when a listed file does not exist.
    """
    rows = []
    for loader, items in loaders.items():
        if loader not in SECTIONS:
            raise ConfigError(f"splits.{loader}: loaders are {', '.join(SECTIONS)}")
        for item in items or []:
            name, section = _item(item, loader)
            if name not in splits:
                raise ConfigError(
                    f"splits.{loader}: no split file named '{name}' (known: {', '.join(sorted(splits))})"
                )
            split = splits[name]
            if datasets is not None:
                if split.source_name not in datasets:
                    raise ConfigError(
                        f"split file {split.origin}: source_name '{split.source_name}' is not a dataset of the dataset sheet"
                    )
                if datasets[split.source_name] != split.species:
                    raise ConfigError(
                        f"split file {split.origin}: species '{split.species}' but the dataset sheet says "
                        f"'{datasets[split.source_name]}' for {split.source_name}"
                    )
            for file in split.files(section):
                path = Path(split.source_path) / file
                if check_files and not path.is_file():
                    raise ConfigError(
                        f"split file {split.origin}: {section} lists '{file}', which does not exist at {path}"
                    )
                rows.append((loader, split.source_name, split.species, file, str(path)))
    frame = pl.DataFrame(rows, schema=MANIFEST_SCHEMA, orient="row")
    return frame.unique(maintain_order=True).sort("split", "source_name", "file")


def _item(item: str | dict[str, str], loader: str) -> tuple[str, str]:
    if isinstance(item, str):
        return item, loader
    if isinstance(item, dict) and set(item) == {"source", "key"} and item["key"] in SECTIONS:
        return str(item["source"]), str(item["key"])
    raise ConfigError(
        f"splits.{loader}: item {item!r} must be a split name or {{source: <split>, key: train|val}}"
    )


def default_splits(
    dataset_files: dict[str, tuple[str, list[str]]],
    *,
    project_path: str,
) -> dict[str, SplitFile]:
    """The default split of every dataset as scConcept split files: all files train.

    The default validation set is made of cells, not files (`holdout_cells`); scConcept split
    files list files, so these list every file under `train` and none under `val`.

    Parameters
    ----------
    dataset_files
        Dataset name -> (species, file names).
    """
    splits = {}
    for dataset, (species, files) in sorted(dataset_files.items()):
        raw = {
            "source_name": dataset,
            "species": species,
            "source_path": SOURCE_PATH,
            "train": sorted(files),
            "val": [],
        }
        splits[dataset] = resolve_split(
            dataset, raw, project_path, origin=f"default split of {dataset}"
        )
    return splits


HOLDOUT_SCHEMA = {"dataset": pl.Utf8, "file": pl.Utf8, "cell": pl.Int64}


def barcode_uniforms(seed: int, dataset: str, names: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per cell name, a pure function of (seed, dataset, name).

    SipHash-2-4 (`pandas.util.hash_array`) keyed by the seed and the dataset: the same barcode
    gets the same value in every file of a dataset, whatever else is in the corpus.
    """
    key = f"{derive_seed(seed, 'holdout', dataset):016x}"[:16]
    hashes = pd.util.hash_array(np.asarray(names, dtype=object), hash_key=key, categorize=False)
    return (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53


def holdout_cells(
    dataset: str,
    files: dict[str, np.ndarray],
    groups: list[list[str]],
    *,
    seed: int,
    val_fraction: float,
    max_cells_per_file: int,
) -> dict[str, np.ndarray]:
    """The cells of a dataset held out for validation by the default split, per file.

    A cell is held out when its name's uniform (`barcode_uniforms`) is below `val_fraction`,
    keeping at most `max_cells_per_file` per file: the smallest uniforms. Files that share
    their barcodes (`groups`, e.g. one sample written twice) are decided together, on the
    union of their names, so a cell is never in training through one file and in validation
    through another. Nothing depends on other datasets, so adding a dataset moves no cell.

    Parameters
    ----------
    files
        File name -> cell names (as in the shard's `obs.parquet`, in shard order).
    groups
        Lists of file names that share barcodes (others are decided alone).

    Returns
    -------
    File name -> sorted indices (into the file's cells) of the held-out cells.
    """
    grouped = {name for group in groups for name in group}
    units = [list(g) for g in groups] + [[name] for name in sorted(files) if name not in grouped]
    out: dict[str, np.ndarray] = {}
    for unit in units:
        names = np.unique(
            np.concatenate([np.asarray(files[f], dtype=object) for f in unit if f in files])
        )
        u = barcode_uniforms(seed, dataset, names)
        candidates = np.flatnonzero(u < val_fraction)
        cap = max_cells_per_file * len(unit)
        chosen = candidates[np.argsort(u[candidates], kind="stable")[:cap]]
        held = names[chosen]
        for name in unit:
            if name in files:
                cells = np.asarray(files[name], dtype=object)
                out[name] = np.flatnonzero(np.isin(cells, held)).astype(np.int64)
    return out


def default_holdout(
    records: list[dict[str, Any]],
    manifests: list[Path],
    *,
    seed: int,
    val_fraction: float,
    max_cells_per_file: int,
) -> pl.DataFrame:
    """The cells every dataset holds out by the default split (`HOLDOUT_SCHEMA`).

    `records` are the datasets' QC records (their `shared_barcodes` groups), `manifests` their
    `shards/<dataset>/manifest.json`; cell names are read from each shard's `obs.parquet`.
    """
    from cellfoundry.shards import shard_folders

    groups = {r["dataset"]: r["shared_barcodes"] for r in records}
    frames = [pl.DataFrame(schema=HOLDOUT_SCHEMA)]
    for manifest in sorted(manifests):
        dataset = Path(manifest).parent.name
        names = {
            f"{folder.name}.h5ad": pl.read_parquet(folder / "obs.parquet", columns=["obs_name"])[
                "obs_name"
            ].to_numpy()
            for folder in shard_folders(Path(manifest).parent)
        }
        held = holdout_cells(
            dataset,
            names,
            [[f"{name}.h5ad" for name in group] for group in groups.get(dataset, [])],
            seed=seed,
            val_fraction=val_fraction,
            max_cells_per_file=max_cells_per_file,
        )
        frames += [
            pl.DataFrame(
                {"dataset": dataset, "file": file, "cell": np.asarray(cells, np.int64)},
                schema=HOLDOUT_SCHEMA,
            )
            for file, cells in sorted(held.items())
        ]
    return pl.concat(frames)


def holdout_by_species(holdout: pl.DataFrame, datasets: dict[str, str]) -> dict[str, int]:
    """Cells held out per species (`datasets`: dataset -> species)."""
    counts: dict[str, int] = {}
    for dataset, n in holdout.group_by("dataset").len().rows():
        counts[datasets[dataset]] = counts.get(datasets[dataset], 0) + n
    return dict(sorted(counts.items()))


def split_yaml(split: SplitFile) -> str:
    """A split as a scConcept split file (its `source_path` keeps the interpolation)."""
    body = {
        "source_name": split.source_name,
        "species": split.species,
        "source_path": SOURCE_PATH,
        "train": split.files("train"),
        "val": split.files("val"),
    }
    return yaml.safe_dump(body, sort_keys=False, default_flow_style=False)
