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

import polars as pl
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cellfoundry.errors import ConfigError
from cellfoundry.seeds import unit_hash

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
    seed: int,
    val_fraction: float,
) -> dict[str, SplitFile]:
    """A seeded file-level split of every dataset, one split per dataset.

    Per species, files are ordered by a hash of (seed, dataset, file) and the first
    `round(val_fraction x n)` go to validation, at least one when the species has two or more
    files and never all of them. Adding a dataset moves at most the files near the cut.

    Parameters
    ----------
    dataset_files
        Dataset name -> (species, file names).
    """
    by_species: dict[str, list[tuple[float, str, str]]] = {}
    for dataset, (species, files) in dataset_files.items():
        for file in files:
            by_species.setdefault(species, []).append(
                (unit_hash(seed, "split", dataset, file), dataset, file)
            )
    val: set[tuple[str, str]] = set()
    for entries in by_species.values():
        entries.sort()
        n = len(entries)
        k = min(max(round(val_fraction * n), 1), n - 1) if n >= 2 else 0
        val |= {(d, f) for _, d, f in entries[:k]}
    splits = {}
    for dataset, (species, files) in sorted(dataset_files.items()):
        sections = {
            "train": sorted(f for f in files if (dataset, f) not in val),
            "val": sorted(f for f in files if (dataset, f) in val),
        }
        raw = {"source_name": dataset, "species": species, "source_path": SOURCE_PATH, **sections}
        splits[dataset] = resolve_split(
            dataset, raw, project_path, origin=f"default split of {dataset}"
        )
    return splits


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
