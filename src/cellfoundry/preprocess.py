"""Stage 2: preprocess one dataset.

For every file of a dataset: find the raw counts, validate them, map genes to the species'
Ensembl IDs, merge duplicate genes, compute QC metrics and filter cells, then write the
preprocessed h5ad (raw integer counts in X, Ensembl IDs as `var_names`, `gene_name` in var,
QC metrics in obs), per-gene statistics for the corpus-level aggregations, a QC report
(JSON + PNG) and a provenance record. Discretization (value bins) happens when the shards
are written; rank order needs corpus medians and is applied by the loader.

Nothing here depends on other datasets, so adding a dataset never reprocesses the others.
"""

from __future__ import annotations

import logging
import platform
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp

from cellfoundry import __version__
from cellfoundry.discretize import qc_metrics
from cellfoundry.errors import DatasetError
from cellfoundry.gene_stats import compute_gene_stats, merge_gene_stats
from cellfoundry.io import atomic_outputs, sha256, write_json
from cellfoundry.readers import dataset_files, read_file
from cellfoundry.reference import ENSEMBL_ID, NCBI_TAXON, GeneReference, symbol_lookup

log = logging.getLogger(__name__)

# Bumped when the meaning of the preprocessed files changes; passed to the rule as a param so
# Snakemake reruns the stage on purpose.
FORMAT_VERSION = 1
INTEGER_TOLERANCE = 1e-6
ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "feature_id", "Accession", "id")
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "feature_name", "symbol", "Gene")
QC_COLUMNS = ("total_counts", "n_genes_by_counts", "mito_fraction")


@dataclass(frozen=True)
class PreprocessSettings:
    """Per-dataset preprocessing parameters (config `preprocess`, overridden by the sheet).

    Attributes
    ----------
    counts
        Where the raw counts are: `auto` (the first of `layers/counts`, `raw.X`, `X` that
        holds non-negative integers), `X`, `raw.X` or `layers/<name>`.
    genes
        Where the gene identifiers are: `auto` (Ensembl IDs if a column holds them, else
        symbols), `var_names` or `var/<column>`.
    min_genes, min_counts, max_genes, max_counts, max_mito_fraction
        Cell QC thresholds; `None` disables a maximum.
    min_mapping_rate
        Fraction of the file's genes that must map to the reference.
    duplicate_genes
        How genes that map to the same Ensembl ID are merged: `sum` or `first`.
    target_sum
        Library size that counts are normalised to for gene statistics.
    """

    counts: str = "auto"
    genes: str = "auto"
    min_genes: int = 200
    min_counts: int = 500
    max_genes: int | None = None
    max_counts: int | None = None
    max_mito_fraction: float = 0.2
    min_mapping_rate: float = 0.5
    duplicate_genes: Literal["sum", "first"] = "sum"
    target_sum: float = 10_000.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class CountsMatrix:
    """Raw counts found in a file, with the gene annotation that goes with them."""

    X: sp.csr_matrix
    var: pd.DataFrame
    source: str
    n_rounded: int = 0


@dataclass
class GeneMapping:
    """Ensembl IDs of a file's genes (None where unmapped) and how they were found."""

    gene_ids: np.ndarray
    column: str
    kind: Literal["ensembl_id", "symbol"]
    how: tuple[str, ...] = ()  # per gene, for symbols: reference.MATCH_KINDS
    release: str | None = None  # the release clone-based symbols were read in

    @property
    def symbol_matches(self) -> dict[str, int]:
        """How many symbols matched (or failed) each way, for the QC record."""
        return dict(sorted(Counter(self.how).items()))

    @property
    def n_mapped(self) -> int:
        return int(sum(g is not None for g in self.gene_ids))

    @property
    def rate(self) -> float:
        return self.n_mapped / max(len(self.gene_ids), 1)


@dataclass
class FileResult:
    """A preprocessed file: the AnnData to write, its QC record and per-cell metrics."""

    name: str
    source: Path
    adata: ad.AnnData
    gene_stats: pl.DataFrame
    qc: dict[str, Any]
    metrics: pd.DataFrame = field(repr=False)


def find_counts(adata: ad.AnnData, where: str, dataset: str, file: Path) -> CountsMatrix:
    """Locate and validate the raw counts of a file.

    Raises
    ------
    DatasetError
        When the named location does not exist, or no candidate holds finite, non-negative
        integer counts; the message says what each candidate holds.
    """
    candidates = ["layers/counts", "raw.X", "X"] if where == "auto" else [where]
    problems = []
    for candidate in candidates:
        found = _counts_at(adata, candidate)
        if found is None:
            if where != "auto":
                raise DatasetError(dataset, file, f"has no {candidate} (config preprocess.counts)")
            continue
        X, var = found
        problem, n_rounded = _validate_counts(X, adata.obs_names, var.index)
        if problem is None:
            if n_rounded:
                log.warning(
                    "%s: %s: %d values within %g of integers were rounded",
                    dataset,
                    file.name,
                    n_rounded,
                    INTEGER_TOLERANCE,
                )
            X.data = np.rint(X.data)
            return CountsMatrix(_as_integer_csr(X), var, candidate, n_rounded)
        problems.append(f"{candidate} {problem}")
    raise DatasetError(
        dataset,
        file,
        "no raw counts: " + "; ".join(problems) + " (counts must be finite, non-negative integers)",
    )


def _counts_at(adata: ad.AnnData, where: str) -> tuple[sp.csr_matrix, pd.DataFrame] | None:
    if where == "X":
        return _to_csr(adata.X), adata.var
    if where == "raw.X":
        if adata.raw is None:
            return None
        return _to_csr(adata.raw.X), adata.raw.var
    if where.startswith("layers/"):
        name = where.removeprefix("layers/")
        if name not in adata.layers:
            return None
        return _to_csr(adata.layers[name]), adata.var
    raise ValueError(f"unknown counts location '{where}' (auto, X, raw.X or layers/<name>)")


def _to_csr(matrix: Any) -> sp.csr_matrix:
    if sp.issparse(matrix):
        X = sp.csr_matrix(matrix, copy=True)
    else:
        X = sp.csr_matrix(np.asarray(matrix))
    X.eliminate_zeros()
    X.sort_indices()
    return X


def _validate_counts(
    X: sp.csr_matrix, obs_names: pd.Index, var_names: pd.Index
) -> tuple[str | None, int]:
    data = X.data
    if data.dtype.kind in "iu":
        bad = np.flatnonzero(data < 0)
        if bad.size:
            return f"holds {bad.size} negative values{_where(X, bad[0], obs_names, var_names)}", 0
        return None, 0
    finite = np.isfinite(data)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        kind = "NaN" if np.isnan(data[bad[0]]) else "infinite"
        return f"holds {bad.size} {kind} values{_where(X, bad[0], obs_names, var_names)}", 0
    bad = np.flatnonzero(data < 0)
    if bad.size:
        return f"holds {bad.size} negative values{_where(X, bad[0], obs_names, var_names)}", 0
    distance = np.abs(data - np.rint(data))
    bad = np.flatnonzero(distance > INTEGER_TOLERANCE)
    if bad.size:
        example = data[bad[0]]
        return (
            f"holds {bad.size} non-integer values such as {example:.6g}"
            f"{_where(X, bad[0], obs_names, var_names)} (normalised data?)"
        ), 0
    return None, int(np.count_nonzero(distance))


def _where(X: sp.csr_matrix, position: int, obs_names: pd.Index, var_names: pd.Index) -> str:
    row = int(np.searchsorted(X.indptr, position, side="right") - 1)
    col = int(X.indices[position])
    return f" (first in cell '{obs_names[row]}', gene '{var_names[col]}')"


def _as_integer_csr(X: sp.csr_matrix) -> sp.csr_matrix:
    dtype = np.int32 if (X.data.size == 0 or X.data.max() < 2**31) else np.int64
    return sp.csr_matrix(
        (X.data.astype(dtype), X.indices.astype(np.int32), X.indptr.astype(np.int64)), shape=X.shape
    )


def map_genes(var: pd.DataFrame, reference: GeneReference, where: str = "auto") -> GeneMapping:
    """Map a file's genes to the reference's Ensembl IDs.

    With `where='auto'`, a column (or `var_names`) where most values look like Ensembl IDs is
    used as IDs (version suffixes dropped); otherwise the symbol column that maps best is
    mapped through current and earlier symbols (see `reference.SymbolIndex`). Genes absent
    from the reference stay unmapped (None).
    """
    known = set(reference.gene_ids.tolist())
    columns = _gene_columns(var, where)
    id_candidates = [(name, values) for name, values in columns if _ensembl_fraction(values) >= 0.5]
    if id_candidates:
        name, values = max(id_candidates, key=lambda item: _ensembl_fraction(item[1]))
        stripped = [re.sub(r"\.\d+$", "", v) for v in values]
        ids = np.array([g if g in known else None for g in stripped], dtype=object)
        return GeneMapping(ids, name, "ensembl_id")
    index = symbol_lookup(reference)
    best: GeneMapping | None = None
    for name, values in columns:
        found = index.map(values)
        ids = np.array(found.gene_ids, dtype=object)
        mapping = GeneMapping(ids, name, "symbol", tuple(found.how), found.release)
        if best is None or mapping.n_mapped > best.n_mapped:
            best = mapping
    assert best is not None
    return best


def _gene_columns(var: pd.DataFrame, where: str) -> list[tuple[str, list[str]]]:
    if where == "var_names":
        return [("var_names", var.index.astype(str).tolist())]
    if where.startswith("var/"):
        column = where.removeprefix("var/")
        if column not in var:
            raise KeyError(column)
        return [(where, var[column].astype(str).tolist())]
    columns = [("var_names", var.index.astype(str).tolist())]
    for column in (*ID_COLUMNS, *SYMBOL_COLUMNS):
        if column in var and _is_text(var[column]):
            columns.append((f"var/{column}", var[column].astype(str).tolist()))
    return columns


def _is_text(series: pd.Series) -> bool:
    return (
        isinstance(series.dtype, pd.CategoricalDtype)
        or series.dtype.kind in "OSU"
        or pd.api.types.is_string_dtype(series)
    )


def _ensembl_fraction(values: list[str]) -> float:
    return sum(bool(ENSEMBL_ID.match(v)) for v in values) / max(len(values), 1)


def check_organism(adata: ad.AnnData, species: str, dataset: str, file: Path) -> None:
    """Fail when CELLxGENE-style organism annotations contradict the dataset's species."""
    expected = NCBI_TAXON.get(species)
    found: set[str] = set()
    if "organism_ontology_term_id" in adata.obs:
        found |= set(adata.obs["organism_ontology_term_id"].astype(str).unique())
    value = adata.uns.get("organism_ontology_term_id")
    if isinstance(value, str):
        found.add(value)
    if len(found) > 1:
        raise DatasetError(
            dataset,
            file,
            f"cells come from several organisms ({', '.join(sorted(found))}); split the file by organism",
        )
    if expected and found and found != {expected}:
        raise DatasetError(
            dataset,
            file,
            f"organism is {found.pop()} but the dataset sheet says {species} ({expected})",
        )


def preprocess_file(
    dataset: str, species: str, path: Path, reference: GeneReference, settings: PreprocessSettings
) -> FileResult:
    """Preprocess one file of a dataset (pure: reads `path`, writes nothing)."""
    adata = read_file(dataset, path)
    check_organism(adata, species, dataset, path)
    counts = find_counts(adata, settings.counts, dataset, path)
    try:
        mapping = map_genes(counts.var, reference, settings.genes)
    except KeyError as error:
        raise DatasetError(
            dataset, path, f"has no var column {error} (config preprocess.genes)"
        ) from error
    n_genes_in = counts.X.shape[1]
    if mapping.rate < settings.min_mapping_rate:
        raise DatasetError(
            dataset,
            path,
            f"only {mapping.n_mapped} of {n_genes_in} genes ({mapping.rate:.1%}) map to the {species} "
            f"reference ({reference.source}) using {mapping.column}; minimum is "
            f"{settings.min_mapping_rate:.0%} (preprocess.min_mapping_rate). Wrong species?",
        )

    names = reference.table.select("gene_id", "gene_name")
    name_of = dict(zip(names["gene_id"].to_list(), names["gene_name"].to_list(), strict=True))
    symbols = [
        name_of.get(g, "") if g is not None else s
        for g, s in zip(mapping.gene_ids, counts.var.index.astype(str), strict=True)
    ]
    mito = np.array([s.upper().startswith("MT-") for s in symbols])
    metrics = qc_metrics(counts.X, mito)
    keep = _qc_filter(metrics, settings)
    n_kept = int(keep.sum())
    qc_table = pd.DataFrame(
        {
            "total_counts": metrics.total_counts,
            "n_genes_by_counts": metrics.n_genes_by_counts,
            "mito_fraction": metrics.mito_fraction,
            "kept": keep,
        },
        index=adata.obs_names.astype(str),
    )
    if n_kept == 0:
        raise DatasetError(
            dataset,
            path,
            f"no cell passes QC ({_qc_summary(qc_table, settings)}); loosen the thresholds for this dataset",
        )

    X, gene_ids, n_duplicates = _collapse_genes(
        counts.X[keep], mapping.gene_ids, settings.duplicate_genes
    )
    obs = _clean_obs(adata.obs.loc[keep])
    for column in QC_COLUMNS:
        obs[column] = qc_table[column].to_numpy()[keep]
    table = reference.table.filter(pl.col("gene_id").is_in(gene_ids.tolist())).sort("gene_id")
    var = pd.DataFrame(
        {
            "gene_name": pd.Categorical(table["gene_name"].to_list()),
            "gene_type": pd.Categorical(table["gene_type"].to_list()),
        },
        index=pd.Index(table["gene_id"].to_list()),
    )
    out = ad.AnnData(X=X, obs=obs, var=var)
    out.obs_names_make_unique()
    out.uns["cellfoundry"] = {
        "dataset": dataset,
        "species": species,
        "counts_source": counts.source,
    }

    stats = compute_gene_stats(
        X, gene_ids, obs["total_counts"].to_numpy(), target_sum=settings.target_sum
    )
    qc = {
        "file": path.name,
        "output": f"{path.stem}.h5ad",
        "counts_source": counts.source,
        "values_rounded": counts.n_rounded,
        "genes_in": n_genes_in,
        "genes_mapped": mapping.n_mapped,
        "mapping_rate": round(mapping.rate, 6),
        "mapped_counts_fraction": round(_mapped_counts_fraction(counts.X, mapping), 6),
        "mapping_column": mapping.column,
        "mapping_kind": mapping.kind,
        "symbol_matches": mapping.symbol_matches,
        "symbol_release": mapping.release,
        "duplicate_genes_merged": n_duplicates,
        "genes_out": int(X.shape[1]),
        "cells_in": int(adata.n_obs),
        "cells_kept": n_kept,
        "cells_failed": _qc_failures(qc_table, settings),
        "median_total_counts_kept": float(np.median(metrics.total_counts[keep])),
        "median_genes_kept": float(np.median(metrics.n_genes_by_counts[keep])),
        "median_mito_fraction_kept": round(float(np.median(metrics.mito_fraction[keep])), 6),
    }
    return FileResult(path.stem, path, out, stats, qc, qc_table)


def _mapped_counts_fraction(X: sp.csr_matrix, mapping: GeneMapping) -> float:
    """Share of all counts that fall on mapped genes (unmapped genes are mostly rare ones)."""
    per_gene = np.bincount(X.indices, weights=X.data, minlength=X.shape[1])
    mapped = np.array([g is not None for g in mapping.gene_ids])
    total = per_gene.sum()
    return float(per_gene[mapped].sum() / total) if total else 0.0


def _qc_filter(metrics: Any, settings: PreprocessSettings) -> np.ndarray:
    keep = (metrics.n_genes_by_counts >= settings.min_genes) & (
        metrics.total_counts >= settings.min_counts
    )
    keep &= metrics.mito_fraction <= settings.max_mito_fraction
    if settings.max_genes is not None:
        keep &= metrics.n_genes_by_counts <= settings.max_genes
    if settings.max_counts is not None:
        keep &= metrics.total_counts <= settings.max_counts
    return np.asarray(keep)


def _qc_failures(table: pd.DataFrame, settings: PreprocessSettings) -> dict[str, int]:
    failures = {
        "min_genes": int((table["n_genes_by_counts"] < settings.min_genes).sum()),
        "min_counts": int((table["total_counts"] < settings.min_counts).sum()),
        "max_mito_fraction": int((table["mito_fraction"] > settings.max_mito_fraction).sum()),
    }
    if settings.max_genes is not None:
        failures["max_genes"] = int((table["n_genes_by_counts"] > settings.max_genes).sum())
    if settings.max_counts is not None:
        failures["max_counts"] = int((table["total_counts"] > settings.max_counts).sum())
    return failures


def _qc_summary(table: pd.DataFrame, settings: PreprocessSettings) -> str:
    failures = _qc_failures(table, settings)
    parts = [f"{name}={getattr(settings, name)} removes {n}" for name, n in failures.items()]
    return f"{len(table)} cells; " + ", ".join(parts)


def _collapse_genes(
    X: sp.csr_matrix, gene_ids: np.ndarray, how: str
) -> tuple[sp.csr_matrix, np.ndarray, int]:
    """Drop unmapped genes and merge genes that map to the same ID; columns sorted by ID."""
    mapped = np.flatnonzero([g is not None for g in gene_ids])
    ids = np.asarray(gene_ids[mapped], dtype=str)
    unique, inverse = np.unique(ids, return_inverse=True)
    n_duplicates = len(ids) - len(unique)
    if how == "first":
        _, first = np.unique(ids, return_index=True)
        rows, cols = mapped[first], np.arange(len(unique))
    else:
        rows, cols = mapped, inverse
    aggregate = sp.csr_matrix(
        (np.ones(len(rows), dtype=X.dtype), (rows, cols)), shape=(X.shape[1], len(unique))
    )
    out = (X @ aggregate).tocsr()
    out.sort_indices()
    out.eliminate_zeros()
    return sp.csr_matrix(out, dtype=X.dtype), unique, n_duplicates


def _clean_obs(obs: pd.DataFrame) -> pd.DataFrame:
    """Keep simple annotation columns (labels, batches); drop QC columns we recompute."""
    keep = {}
    for column in obs.columns:
        series = obs[column]
        if column in QC_COLUMNS:
            continue
        if _is_text(series) or series.dtype.kind == "b":
            keep[str(column)] = pd.Categorical(series.astype(str).to_numpy())
        elif series.dtype.kind in "iuf":
            keep[str(column)] = series.to_numpy()
    return pd.DataFrame(keep, index=pd.Index(obs.index.astype(str)))


@dataclass
class DatasetOutputs:
    """Where one dataset's preprocessing writes."""

    h5ad_dir: Path
    gene_stats: Path
    qc_json: Path
    qc_plot: Path
    provenance: Path


def preprocess_dataset(
    dataset: str,
    species: str,
    path: str | Path,
    reference: GeneReference | None,
    settings: PreprocessSettings,
    outputs: DatasetOutputs,
    *,
    config_slice: dict[str, Any] | None = None,
) -> list[FileResult]:
    """Preprocess every file of a dataset and write all its outputs atomically.

    Either all outputs appear, or (on any error) none does.
    """
    files = dataset_files(dataset, path)
    if reference is None:
        from cellfoundry.reference import bundled_species

        raise DatasetError(
            dataset,
            files[0],
            f"species '{species}' has no gene reference (bundled: {', '.join(bundled_species())}); "
            f"add a table under reference.tables.{species} in the config",
        )
    results = []
    for file in files:
        log.info("%s: reading %s", dataset, file)
        result = preprocess_file(dataset, species, file, reference, settings)
        log.info(
            "%s: %s: %d/%d cells kept, %d/%d genes mapped (%.1f%%) from %s",
            dataset,
            file.name,
            result.qc["cells_kept"],
            result.qc["cells_in"],
            result.qc["genes_mapped"],
            result.qc["genes_in"],
            100 * result.qc["mapping_rate"],
            result.qc["counts_source"],
        )
        results.append(result)

    stats = merge_gene_stats([r.gene_stats for r in results])
    qc = {
        "dataset": dataset,
        "species": species,
        "settings": asdict(settings),
        "files": [r.qc for r in results],
        "cells_in": sum(r.qc["cells_in"] for r in results),
        "cells_kept": sum(r.qc["cells_kept"] for r in results),
        "genes_out": int(stats.height),
        "mapping_rate": round(
            sum(r.qc["genes_mapped"] for r in results)
            / max(sum(r.qc["genes_in"] for r in results), 1),
            6,
        ),
    }
    with atomic_outputs(
        outputs.h5ad_dir, outputs.gene_stats, outputs.qc_json, outputs.qc_plot, outputs.provenance
    ) as (h5ad_dir, stats_path, qc_path, plot_path, provenance_path):
        h5ad_dir.mkdir()
        written = []
        for result in results:
            target = h5ad_dir / f"{result.name}.h5ad"
            result.adata.write_h5ad(target)
            written.append(
                {"file": target.name, "sha256": sha256(target), "n_obs": result.adata.n_obs}
            )
        stats.write_parquet(stats_path, statistics=False)
        write_json(qc_path, qc)
        from cellfoundry.plots import plot_qc

        plot_qc(dataset, [r.metrics for r in results], settings, plot_path)
        write_json(
            provenance_path,
            {
                "dataset": dataset,
                "species": species,
                "inputs": [
                    {"file": str(f), "sha256": sha256(f), "bytes": f.stat().st_size} for f in files
                ],
                "outputs": written,
                "reference": reference.source,
                "config": config_slice if config_slice is not None else asdict(settings),
                "format_version": FORMAT_VERSION,
                "versions": software_versions(),
            },
        )
    return results


def software_versions() -> dict[str, str]:
    """Versions of the software that shaped the outputs."""
    from importlib.metadata import version

    packages = ("anndata", "numpy", "scipy", "h5py", "numba", "polars", "pandas")
    return {"cellfoundry": __version__, "python": platform.python_version()} | {
        name: version(name) for name in packages
    }
