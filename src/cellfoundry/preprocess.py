"""Stage 2: preprocess one input file of a dataset, streaming it a block of cells at a time.

`preprocess_file` reads the file once, in blocks (`block_cells`, a runtime setting): it finds
the raw counts, keeps the gene-expression features of the dataset's species, validates the
counts, maps genes to the species' Ensembl IDs (summing genes that map to one ID), computes QC
metrics and filters cells, and for the cells kept appends to the training shard (with their
quantile bins) and to the per-gene statistics. At the end it writes the preprocessed h5ad
(raw integer counts in X, Ensembl IDs as `var_names`, `gene_name`/`gene_type` in var, QC
metrics in obs) from the shard's arrays, the file's statistics and its QC record. Memory is
O(block + genes) plus a few bytes per cell; outputs are byte-identical whatever the block
size; on any error nothing is left behind.

`aggregate_dataset` then merges a dataset's files: statistics, QC record and figure,
provenance and the shard manifest. Nothing here depends on other datasets, so adding a dataset
never reprocesses the others.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numba
import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp

from cellfoundry import __version__
from cellfoundry.config import schema_default
from cellfoundry.discretize import quantile_bins_csr
from cellfoundry.errors import DatasetError
from cellfoundry.formats import PREPROCESS as FORMAT_VERSION
from cellfoundry.gene_stats import (
    EXACT_MAX_CELLS,
    GeneStatsAccumulator,
    merge_gene_stats,
    write_gene_stats,
)
from cellfoundry.io import atomic_outputs, blake3, read_json, remove, write_json
from cellfoundry.readers import (
    GENE_EXPRESSION,
    CellReader,
    CscTooLarge,
    MtxUnordered,
    open_source,
)
from cellfoundry.reference import (
    ENSEMBL_ID,
    NCBI_TAXON,
    GeneReference,
    symbol_index,
    symbol_lookup,
)
from cellfoundry.seeds import derive_seed
from cellfoundry.shards import ShardWriter, write_dataset_manifest
from cellfoundry.sources import SourceFile, dataset_sources

log = logging.getLogger(__name__)

INTEGER_TOLERANCE = 1e-6
ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "feature_id", "Accession", "id")
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "feature_name", "symbol", "Gene")
FEATURE_TYPE_COLUMNS = ("feature_types", "feature_type")
QC_COLUMNS = ("total_counts", "n_genes_by_counts", "mito_fraction")
SPIKE_IN = re.compile(r"^ERCC-\d+")
# Ensembl gene ID prefixes of common species, to name a likely species when IDs do not map.
ENSEMBL_PREFIXES = {
    "ENSG": "hsapiens",
    "ENSMUSG": "mmusculus",
    "ENSRNOG": "rnorvegicus",
    "ENSDARG": "drerio",
    "ENSBTAG": "btaurus",
    "ENSSSCG": "sscrofa",
    "ENSMMUG": "mmulatta",
    "ENSGALG": "ggallus",
    "ENSMFAG": "mfascicularis",
    "ENSCAFG": "clfamiliaris",
}
# Symbols that match the declared species only after changing case, while another species
# matches this many times more of them exactly, fail the file as a likely species mismatch.
SPECIES_MISMATCH_RATIO = 2.0
# The default number of cells read per block (a runtime setting: `--block-cells`).
BLOCK_CELLS = 4096


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
        Fraction of the file's gene-expression features that must map to the reference.
    duplicate_genes
        How features that map to the same Ensembl ID are merged: `sum` or `first`.
    target_sum
        Library size that counts are normalised to for gene statistics.
    """

    counts: str = schema_default("preprocess.counts")
    genes: str = schema_default("preprocess.genes")
    min_genes: int = schema_default("preprocess.min_genes")
    min_counts: int = schema_default("preprocess.min_counts")
    max_genes: int | None = schema_default("preprocess.max_genes")
    max_counts: int | None = schema_default("preprocess.max_counts")
    max_mito_fraction: float = schema_default("preprocess.max_mito_fraction")
    min_mapping_rate: float = schema_default("preprocess.min_mapping_rate")
    duplicate_genes: Literal["sum", "first"] = schema_default("preprocess.duplicate_genes")
    target_sum: float = schema_default("preprocess.target_sum")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class FileOutputs:
    """Where the preprocessing of one file writes (all staged, moved into place together)."""

    h5ad: Path
    shard: Path
    gene_stats: Path
    qc: Path
    cells: Path


# --- features: what each column of the counts matrix becomes ---------------------------------


@dataclass
class FeaturePlan:
    """What becomes of each feature (column) of a file's counts matrix.

    Attributes
    ----------
    gene_ids
        Output genes (Ensembl IDs) in order of their first feature in the file.
    out_col
        Per feature: its output gene, or -1 (unmapped, left out, or a duplicate with
        `duplicate_genes='first'`).
    primary
        Per feature: it is the first feature of its output gene (later ones merge into it).
    role
        Per feature: 0 when its counts are the cell's (gene expression of the dataset's
        species, mapped or not), k > 0 when it is left out, as `categories[k - 1]`.
    categories
        Names of what is left out (a feature type, another genome, spike-ins).
    mito
        Per feature: a mitochondrial gene (symbol starting with MT-).
    mapped
        Per feature: a gene-expression feature of the species that maps to a reference gene.
    report
        How genes were mapped, for the QC record.
    """

    gene_ids: np.ndarray
    out_col: np.ndarray
    primary: np.ndarray
    role: np.ndarray
    categories: list[str]
    mito: np.ndarray
    mapped: np.ndarray
    report: dict[str, Any]


def _text_column(var: pd.DataFrame, names: tuple[str, ...]) -> np.ndarray | None:
    for name in names:
        if name in var:
            return var[name].astype(str).to_numpy()
    return None


def _is_text(series: pd.Series) -> bool:
    return (
        isinstance(series.dtype, pd.CategoricalDtype)
        or series.dtype.kind in "OSU"
        or pd.api.types.is_string_dtype(series)
    )


def _gene_columns(var: pd.DataFrame, where: str) -> list[tuple[str, np.ndarray]]:
    if where == "var_names":
        return [("var_names", var.index.astype(str).to_numpy())]
    if where.startswith("var/"):
        column = where.removeprefix("var/")
        if column not in var:
            raise KeyError(column)
        return [(where, var[column].astype(str).to_numpy())]
    columns = [("var_names", var.index.astype(str).to_numpy())]
    for column in (*ID_COLUMNS, *SYMBOL_COLUMNS):
        if column in var and _is_text(var[column]):
            columns.append((f"var/{column}", var[column].astype(str).to_numpy()))
    return columns


def _strip_genome_prefix(values: np.ndarray, genomes: np.ndarray | None) -> np.ndarray:
    """Cell Ranger's multi-genome references prefix IDs and names with the genome
    (`GRCh38_ENSG...`, `mm10___ENSMUSG...`)."""
    if genomes is None:
        return np.array(
            [re.sub(r"^[A-Za-z0-9.]+_+(?=ENS[A-Z]*G\d)", "", v) for v in values], dtype=object
        )
    return np.array(
        [
            v[len(g) :].lstrip("_") if g and v.startswith(g + "_") else v
            for v, g in zip(values, genomes, strict=True)
        ],
        dtype=object,
    )


def _ensembl_fraction(values: np.ndarray) -> float:
    return sum(bool(ENSEMBL_ID.match(v)) for v in values) / max(len(values), 1)


@dataclass
class GeneMapping:
    """Ensembl IDs of features (None where unmapped) and how they were found.

    `matches` counts how the features matched: for IDs `exact`/`unmapped`; for symbols the
    kinds of `reference.SymbolIndex.lookup` (exact, case, previous, previous-case, synonym,
    synonym-case, ambiguous, retired, clone, collision, unknown); `release` is the release a
    file's clone-based symbols were read in.
    """

    gene_ids: np.ndarray
    column: str
    kind: Literal["ensembl_id", "symbol"]
    matches: dict[str, int]
    release: str | None = None
    how: tuple[str, ...] = ()  # per feature, for symbols: how it matched

    @property
    def symbol_matches(self) -> dict[str, int]:
        """How many symbols matched (or failed) each way."""
        return self.matches if self.kind == "symbol" else {}

    @property
    def n_mapped(self) -> int:
        return int(sum(g is not None for g in self.gene_ids))

    @property
    def rate(self) -> float:
        return self.n_mapped / max(len(self.gene_ids), 1)

    @property
    def case_folded(self) -> int:
        """Symbols that matched only after changing case."""
        return sum(n for how, n in self.matches.items() if how == "case" or how.endswith("-case"))

    @property
    def matched_as_written(self) -> int:
        """Symbols that matched as written (current, earlier or alias symbols)."""
        return sum(self.matches.get(how, 0) for how in ("exact", "previous", "synonym"))


def map_genes(var: pd.DataFrame, reference: GeneReference, where: str = "auto") -> GeneMapping:
    """Map a file's features (`var`) to the reference's Ensembl IDs, from the column `where`
    names (`auto`, `var_names` or `var/<column>`, config `preprocess.genes`); see
    `map_columns`.

    Raises
    ------
    KeyError
        When `where` names a column `var` does not have.
    """
    return map_columns(_gene_columns(var, where), reference)


def map_columns(columns: list[tuple[str, np.ndarray]], reference: GeneReference) -> GeneMapping:
    """Map features to the reference's Ensembl IDs, from candidate (name, values) columns.

    A column where at least half the values look like Ensembl IDs is used as IDs (version
    suffixes dropped); otherwise the symbol column that maps best is mapped through current
    and earlier symbols and aliases (`reference.SymbolIndex`).
    """
    known = set(reference.gene_ids.tolist())
    id_candidates = [(name, values) for name, values in columns if _ensembl_fraction(values) >= 0.5]
    if id_candidates:
        name, values = max(id_candidates, key=lambda item: _ensembl_fraction(item[1]))
        stripped = [re.sub(r"\.\d+$", "", v) for v in values]
        ids = np.array([g if g in known else None for g in stripped], dtype=object)
        n = int(sum(g is not None for g in ids))
        return GeneMapping(ids, name, "ensembl_id", {"exact": n, "unmapped": len(ids) - n})
    index = symbol_lookup(reference)
    best: GeneMapping | None = None
    for name, values in columns:
        found = index.map([str(v) for v in values])
        mapping = GeneMapping(
            np.array(found.gene_ids, dtype=object),
            name,
            "symbol",
            dict(sorted(Counter(found.how).items())),
            found.release,
            tuple(found.how),
        )
        if best is None or mapping.n_mapped > best.n_mapped:
            best = mapping
    assert best is not None
    return best


def _likely_species(
    mapping: GeneMapping, values: np.ndarray, species: str, reference: GeneReference
) -> tuple[str, str] | None:
    """(species, evidence) when the features look like another species' genes."""
    if mapping.kind == "ensembl_id":
        prefixes = pd.Series([re.match(r"^(ENS[A-Z]*?G)\d", v) for v in values]).dropna()
        found = pd.Series([m.group(1) for m in prefixes]).value_counts()
        if found.empty:
            return None
        prefix, n = found.index[0], int(found.iloc[0])
        other = ENSEMBL_PREFIXES.get(prefix)
        if other and other != species:
            return other, f"{n} of {len(values)} IDs start with {prefix}"
        return None
    from cellfoundry.reference import bundled_species, load_bundled

    own_exact = mapping.matched_as_written
    best = None
    for other in bundled_species():
        if other == species:
            continue
        exact = symbol_index(load_bundled(other), fold_case=False)
        n = int(sum(v in exact for v in values))
        if n > SPECIES_MISMATCH_RATIO * max(own_exact, 1) and (best is None or n > best[1]):
            best = (other, n)
    if best is None:
        return None
    return best[0], (
        f"{best[1]} of {len(values)} symbols match {best[0]} symbols exactly, only {own_exact} "
        f"match {species} ({reference.source}) as written ({mapping.case_folded} more "
        "only after changing case)"
    )


def plan_features(
    var: pd.DataFrame,
    dataset: str,
    species: str,
    path: Path,
    reference: GeneReference,
    settings: PreprocessSettings,
) -> FeaturePlan:
    """Decide what each feature of a counts matrix becomes (see `FeaturePlan`).

    Raises
    ------
    DatasetError
        When the named gene column does not exist, too few gene-expression features map to the
        reference, or the genes look like another species'.
    """
    n = len(var)
    categories: list[str] = []
    role = np.zeros(n, dtype=np.int8)

    def leave_out(mask: np.ndarray, name: str) -> None:
        mask = mask & (role == 0)
        if mask.any():
            categories.append(name)
            role[mask] = len(categories)

    types = _text_column(var, FEATURE_TYPE_COLUMNS)
    if types is not None:
        for kind in sorted(set(types) - {GENE_EXPRESSION}):
            leave_out(types == kind, kind)
    names = var.index.astype(str).to_numpy()
    leave_out(np.array([bool(SPIKE_IN.match(v)) for v in names]), "ERCC spike-in")
    genomes = _text_column(var, ("genome",))
    try:
        columns = _gene_columns(var, settings.genes)
    except KeyError as error:
        raise DatasetError(
            dataset, path, f"has no var column {error} (config preprocess.genes)"
        ) from error
    if genomes is not None and len(set(genomes[role == 0])) > 1:
        # A multi-genome (barnyard) file: keep the genome whose genes map best to the species.
        scores = {}
        for genome in sorted(set(genomes[role == 0])):
            rows = (genomes == genome) & (role == 0)
            sub = [(c, _strip_genome_prefix(v[rows], genomes[rows])) for c, v in columns]
            scores[genome] = map_columns(sub, reference).n_mapped
        keep = max(scores, key=lambda g: (scores[g], g))
        for genome in sorted(scores):
            if genome != keep:
                leave_out(genomes == genome, f"genome {genome}")
    counted = role == 0
    columns = [(c, _strip_genome_prefix(v, genomes)) for c, v in columns]
    mapping = map_columns([(c, v[counted]) for c, v in columns], reference)
    n_counted = int(counted.sum())
    mapped_column = dict(columns).get(mapping.column, names)[counted]
    if mapping.rate < settings.min_mapping_rate:
        other = _likely_species(mapping, mapped_column, species, reference)
        hint = f"; they look like {other[0]} genes ({other[1]})" if other else ". Wrong species?"
        raise DatasetError(
            dataset,
            path,
            f"only {mapping.n_mapped} of {n_counted} genes ({mapping.rate:.1%}) map to the {species} "
            f"reference ({reference.source}) using {mapping.column}; minimum is "
            f"{settings.min_mapping_rate:.0%} (preprocess.min_mapping_rate){hint}",
        )
    if mapping.kind == "symbol" and mapping.case_folded > mapping.matched_as_written:
        other = _likely_species(mapping, mapped_column, species, reference)
        if other is not None:
            raise DatasetError(
                dataset,
                path,
                f"genes look like {other[0]}, not {species}: {other[1]}; fix the species in the dataset sheet",
            )
        log.warning(
            "%s: %s: %d symbols map to %s only after changing case (%d as written)",
            dataset,
            path.name,
            mapping.case_folded,
            species,
            mapping.matched_as_written,
        )

    gene_of = np.full(n, None, dtype=object)
    gene_of[counted] = mapping.gene_ids
    name_of = dict(
        zip(
            reference.table["gene_id"].to_list(),
            reference.table["gene_name"].to_list(),
            strict=True,
        )
    )
    symbols = _text_column(var, SYMBOL_COLUMNS)
    symbols = names if symbols is None else symbols
    mito = np.array(
        [
            counted[i]
            and (name_of.get(gene_of[i], "") if gene_of[i] is not None else symbols[i])
            .upper()
            .startswith("MT-")
            for i in range(n)
        ]
    )
    out_col = np.full(n, -1, dtype=np.int32)
    primary = np.zeros(n, dtype=bool)
    first: dict[str, int] = {}
    for i in np.flatnonzero(counted):
        gene = gene_of[i]
        if gene is None:
            continue
        if gene not in first:
            first[gene] = len(first)
            primary[i] = True
            out_col[i] = first[gene]
        elif settings.duplicate_genes == "sum":
            out_col[i] = first[gene]
    report = {
        "genes_in": n,
        "features_left_out": {
            name: int((role == k + 1).sum()) for k, name in enumerate(categories)
        },
        "genes_counted": n_counted,
        "genes_mapped": mapping.n_mapped,
        "mapping_rate": round(mapping.rate, 6),
        "mapping_column": mapping.column,
        "mapping_kind": mapping.kind,
        "mapping_matches": mapping.matches,
        "symbol_release": mapping.release,
        "duplicate_genes_merged": mapping.n_mapped - len(first),
        "mito_genes": int(mito.sum()),
    }
    mapped = np.array([g is not None for g in gene_of], dtype=bool)
    return FeaturePlan(
        np.array(list(first), dtype=object),
        out_col,
        primary,
        role,
        categories,
        mito,
        mapped,
        report,
    )


# --- counts: where they are, and their validation ---------------------------------------------


def find_counts(reader: CellReader, where: str, dataset: str, path: Path, block_cells: int) -> str:
    """The location of the raw counts (`X`, `raw.X`, `layers/<name>`), checked on the first block.

    Every later block is checked as it streams (`check_counts`), so a problem in a late block
    still fails the file before anything is written.

    Raises
    ------
    DatasetError
        When the named location does not exist, or no candidate holds finite, non-negative
        integer counts; the message says what each candidate holds and which layers exist.
    """
    present = reader.locations()
    candidates = ["layers/counts", "raw.X", "X"] if where == "auto" else [where]
    layers = [p for p in present if p.startswith("layers/")]
    available = f"; the file has {', '.join(present) or 'no matrix'}"
    if where != "auto" and where not in present:
        raise DatasetError(dataset, path, f"has no {where} (config preprocess.counts){available}")
    problems = []
    for candidate in candidates:
        if candidate not in present:
            continue
        _, block = next(_blocks(reader, candidate, min(block_cells, 1024), dataset, path))
        problem = check_counts(block, 0, reader, candidate)[1]
        if problem is None:
            return candidate
        problems.append(f"{candidate} {problem}")
    if not problems:
        hint = f"; set preprocess.counts to one of {', '.join(layers)}" if layers else ""
        raise DatasetError(
            dataset, path, f"X is absent and there is no layers/counts or raw.X{available}{hint}"
        )
    hint = (
        f"; set preprocess.counts to one of {', '.join(layers)}"
        if layers and where == "auto"
        else ""
    )
    raise DatasetError(
        dataset,
        path,
        "no raw counts: "
        + "; ".join(problems)
        + " (counts must be finite, non-negative integers)"
        + hint,
    )


_COUNT_PROBLEMS = {
    1: "NaN values",
    2: "infinite values",
    3: "negative values",
    4: "non-integer values",
    5: "values above 2^31 - 1",
}


@numba.njit(cache=True, nogil=True)
def _as_counts(data, tolerance):  # pragma: no cover - compiled
    """int32 counts of a block's values, in one pass: (counts, problem, position, rounded).

    problem: 0 none, 1 NaN, 2 infinite, 3 negative, 4 not within `tolerance` of an integer,
    5 above int32; position: the first offending value; rounded: values that were not exact
    integers but within the tolerance.
    """
    out = np.empty(data.shape[0], dtype=np.int32)
    rounded = 0
    for i in range(data.shape[0]):
        x = data[i]
        if x != x:
            return out, 1, i, rounded
        if np.isinf(np.float64(x)):
            return out, 2, i, rounded
        if x < 0:
            return out, 3, i, rounded
        r = np.rint(np.float64(x))
        if r > 2147483647.0:
            return out, 5, i, rounded
        if r != x:
            if abs(np.float64(x) - r) > tolerance:
                return out, 4, i, rounded
            rounded += 1
        out[i] = np.int32(r)
    return out, 0, -1, rounded


def check_counts(
    block: sp.csr_matrix, start: int, reader: CellReader, location: str
) -> tuple[np.ndarray, str | None, int]:
    """(int32 counts, problem, values rounded): counts must be finite, non-negative integers;
    values within `INTEGER_TOLERANCE` of an integer are accepted (and rounded)."""
    counts, problem, position, rounded = _as_counts(block.data, INTEGER_TOLERANCE)
    if not problem:
        return counts, None, rounded
    text = _COUNT_PROBLEMS[problem]
    if problem == 4:
        text += f" such as {block.data[position]:.6g}"
    where = _where(block, position, start, reader, location)
    return counts, f"holds {text}{where}" + (" (normalised data?)" if problem == 4 else ""), 0


def _where(
    block: sp.csr_matrix, position: int, start: int, reader: CellReader, location: str
) -> str:
    row = int(np.searchsorted(block.indptr, position, side="right") - 1)
    col = int(block.indices[position])
    return f" (first in cell '{reader.obs.index[start + row]}', gene '{reader.var(location).index[col]}')"


# --- the streaming pass -----------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _cell_metrics(indptr, indices, counts, role, mito, feature_sums):  # pragma: no cover - compiled
    n = indptr.shape[0] - 1
    total = np.zeros(n)
    n_genes = np.zeros(n, dtype=np.int64)
    mito_counts = np.zeros(n)
    for cell in range(n):
        for j in range(indptr[cell], indptr[cell + 1]):
            feature = indices[j]
            x = counts[j]
            feature_sums[feature] += x
            if role[feature] == 0 and x > 0:
                total[cell] += x
                n_genes[cell] += 1
                if mito[feature]:
                    mito_counts[cell] += x
    return total, n_genes, mito_counts


@numba.njit(cache=True, nogil=True)
def _collapse(indptr, indices, counts, keep, out_col, primary):  # pragma: no cover - compiled
    """Kept cells' entries over output genes, ascending per cell; duplicates summed in."""
    n = indptr.shape[0] - 1
    size = 0
    for cell in range(n):
        if keep[cell]:
            size += indptr[cell + 1] - indptr[cell]
    out_indptr = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    genes = np.empty(size, dtype=np.int32)
    values = np.empty(size, dtype=np.int32)
    k = 0
    row = 0
    for cell in range(n):
        if not keep[cell]:
            continue
        lo = k
        # First features of each gene come in increasing output order (genes are numbered in
        # order of their first feature), so they are written in order.
        for j in range(indptr[cell], indptr[cell + 1]):
            feature = indices[j]
            if primary[feature] and counts[j] > 0:
                genes[k] = out_col[feature]
                values[k] = counts[j]
                k += 1
        # Later features of a gene are added to it, inserted in order when it is absent.
        for j in range(indptr[cell], indptr[cell + 1]):
            feature = indices[j]
            target = out_col[feature]
            if primary[feature] or target < 0 or counts[j] == 0:
                continue
            position = lo + np.searchsorted(genes[lo:k], target)
            if position < k and genes[position] == target:
                values[position] += counts[j]
            else:
                for m in range(k, position, -1):
                    genes[m] = genes[m - 1]
                    values[m] = values[m - 1]
                genes[position] = target
                values[position] = counts[j]
                k += 1
        row += 1
        out_indptr[row] = k
    return out_indptr, genes[:k], values[:k]


def _qc_keep(
    total: np.ndarray, n_genes: np.ndarray, mito: np.ndarray, settings: PreprocessSettings
) -> np.ndarray:
    keep = (n_genes >= settings.min_genes) & (total >= settings.min_counts)
    keep &= mito <= settings.max_mito_fraction
    if settings.max_genes is not None:
        keep &= n_genes <= settings.max_genes
    if settings.max_counts is not None:
        keep &= total <= settings.max_counts
    return keep


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


def check_organism(organisms: set[str], species: str, dataset: str, path: Path) -> None:
    """Fail when CELLxGENE-style organism annotations contradict the dataset's species."""
    expected = NCBI_TAXON.get(species)
    if len(organisms) > 1:
        raise DatasetError(
            dataset,
            path,
            f"cells come from several organisms ({', '.join(sorted(organisms))}); split the file by organism",
        )
    if expected and organisms and organisms != {expected}:
        raise DatasetError(
            dataset,
            path,
            f"organism is {next(iter(organisms))} but the dataset sheet says {species} ({expected})",
        )


def clean_obs(obs: pd.DataFrame) -> pd.DataFrame:
    """Annotation columns worth keeping (labels, batches, numbers); QC columns we recompute are
    dropped. Text becomes categorical; missing values stay missing (never the string 'nan')."""
    keep: dict[str, Any] = {}
    for column in obs.columns:
        series = obs[column]
        if column in QC_COLUMNS:
            continue
        if _is_text(series) or series.dtype.kind == "b" or pd.api.types.is_bool_dtype(series):
            values = series.astype(object).where(series.notna(), None)
            keep[str(column)] = pd.Categorical([None if v is None else str(v) for v in values])
        elif series.dtype.kind in "iuf" or pd.api.types.is_numeric_dtype(series):
            keep[str(column)] = series.to_numpy(dtype=np.float64 if series.hasnans else None)
    return pd.DataFrame(keep, index=pd.Index(obs.index.astype(str)))


def barcode_sketch(names: pd.Index, k: int = 256) -> list[int]:
    """The `k` smallest 64-bit hashes of a file's cell names (a bottom-k MinHash sketch).

    Two files' sketches estimate how many cell barcodes they share (a Cell Ranger filtered and
    raw matrix, or one sample twice) without keeping the barcodes. Files sketch the cells they
    keep (the names their shards and the default split use): a raw matrix's hundreds of
    thousands of empty droplets would leave almost none of a filtered matrix's barcodes among
    the union's k smallest hashes.
    """
    hashes = pd.util.hash_array(np.asarray(names.astype(str), dtype=object))
    hashes = np.unique(hashes)
    return [int(h) for h in np.sort(hashes)[:k]]


def preprocess_file(
    dataset: str,
    species: str,
    source: SourceFile,
    reference: GeneReference,
    settings: PreprocessSettings,
    outputs: FileOutputs,
    *,
    n_bins: int,
    seed: int = 0,
    tie_break: str = "random",
    block_cells: int = BLOCK_CELLS,
    exact_max_cells: int = EXACT_MAX_CELLS,
) -> dict[str, Any]:
    """Preprocess one input of a dataset, streaming it, and write all its outputs atomically.

    `seed` is the config's: the shard's quantile bins break ties (`tie_break`, see
    `discretize.quantile_bins_csr`) with a seed derived from it, the dataset and the file,
    and each cell's index in the file, so they do not depend on blocks or on other files.

    Returns the file's QC record (also written to `outputs.qc`).

    Raises
    ------
    DatasetError
        For unreadable files, missing or invalid counts (found in any block), too few mapped
        genes, a species mismatch, contradicting organism annotations, or no cell passing QC.
        Nothing of the outputs exists afterwards.
    """
    path = source.path
    with (
        open_source(dataset, source) as reader,
        atomic_outputs(
            outputs.h5ad, outputs.shard, outputs.gene_stats, outputs.qc, outputs.cells
        ) as (h5ad_path, shard_path, stats_path, qc_path, cells_path),
        contextlib.ExitStack() as stack,
    ):
        check_organism(reader.organisms(), species, dataset, path)
        location = find_counts(reader, settings.counts, dataset, path, block_cells)
        var = reader.var(location)
        plan = plan_features(var, dataset, species, path, reference, settings)
        writer = ShardWriter(shard_path, n_bins=n_bins)
        bin_seed = derive_seed(seed, "bins", dataset, source.name)
        h5ad = H5adWriter(
            h5ad_path, max_nnz=reader.stored_entries(location), max_cells=reader.n_obs
        )
        stack.callback(h5ad.abort)
        stats = GeneStatsAccumulator(
            len(plan.gene_ids), target_sum=settings.target_sum, exact_max_cells=exact_max_cells
        )
        feature_sums = np.zeros(len(var))
        # Per-cell QC, filled block by block: allocated once, not as small arrays that stay
        # for the whole file between the blocks' large short-lived ones (heap fragmentation
        # grew the job by 0.2 GiB over a 1M-cell file, `benchmarks/bench_scale.py`).
        cell_qc = {
            name: np.zeros(reader.n_obs, dtype=dtype)
            for name, dtype in zip(
                (*QC_COLUMNS, "kept"), (float, np.int64, float, bool), strict=True
            )
        }
        n_rounded, n_read = 0, 0
        for start, block in _blocks(reader, location, block_cells, dataset, path):
            counts, problem, rounded = check_counts(block, start, reader, location)
            if problem is not None:
                raise DatasetError(
                    dataset,
                    path,
                    f"{location} {problem} (counts must be finite, non-negative integers)",
                )
            n_rounded += rounded
            total, n_genes, mito_counts = _cell_metrics(
                block.indptr, block.indices, counts, plan.role, plan.mito, feature_sums
            )
            mito = np.divide(mito_counts, total, out=np.zeros_like(total), where=total > 0)
            keep = _qc_keep(total, n_genes, mito, settings)
            rows = slice(start, start + len(total))
            for column, values in zip(cell_qc.values(), (total, n_genes, mito, keep), strict=True):
                column[rows] = values
            n_read += len(total)
            out_indptr, genes, values = _collapse(
                block.indptr, block.indices, counts, keep, plan.out_col, plan.primary
            )
            bins = quantile_bins_csr(
                out_indptr,
                values,
                n_bins,
                seed=bin_seed,
                cell_ids=start + np.flatnonzero(keep),
                tie_break=tie_break,
            )
            writer.append(out_indptr, genes, values, bins, total[keep])
            h5ad.append(out_indptr, genes, values)
            stats.add_cells(out_indptr, genes, values, total[keep])
        n_rounded and log.warning(
            "%s: %s: %d values within %g of integers were rounded",
            dataset,
            path.name,
            n_rounded,
            INTEGER_TOLERANCE,
        )
        # The statistics first: their pools (hundreds of MB for a file of millions of cells)
        # are freed before the cells' annotations are read (`reader.obs`) and written.
        write_gene_stats(stats.tables(plan.gene_ids), stats_path)
        del stats
        if n_read != reader.n_obs:
            raise DatasetError(
                dataset, path, f"{location} holds {n_read} cells but obs {reader.n_obs}"
            )
        table = pd.DataFrame(cell_qc, index=reader.obs.index)
        kept = table["kept"].to_numpy()
        if not kept.any():
            raise DatasetError(
                dataset,
                path,
                f"no cell passes QC ({len(table)} cells; "
                + ", ".join(
                    f"{name}={getattr(settings, name)} removes {n}"
                    for name, n in _qc_failures(table, settings).items()
                )
                + "); loosen the thresholds for this dataset",
            )
        obs = clean_obs(reader.obs.loc[kept])
        for column in QC_COLUMNS:
            obs[column] = table[column].to_numpy()[kept]
        obs.index = pd.Index(_unique_names(obs.index))
        out_var = _output_var(plan.gene_ids, reference)
        inputs = _input_checksums(source)
        info = writer.close(
            out_var, obs, {"dataset": dataset, "species": species, "file": f"{source.name}.h5ad"}
        )
        h5ad.close(
            obs,
            out_var,
            {"cellfoundry": {"dataset": dataset, "species": species, "counts_source": location}},
        )
        pl.from_pandas(table.reset_index(names="obs_name")).write_parquet(
            cells_path, statistics=False
        )
        counted_sum = float(feature_sums[plan.role == 0].sum())
        mapped_sum = float(feature_sums[plan.mapped].sum())
        warnings = []
        if plan.report["mito_genes"] == 0:
            warnings.append(
                "no mitochondrial (MT-) gene among the mapped genes: mito_fraction is 0 for every cell and max_mito_fraction filters nothing"
            )
        for warning in warnings:
            log.warning("%s: %s: %s", dataset, path.name, warning)
        qc = {
            "file": source.name,
            "source": str(path),
            "format": source.format,
            "output": f"{source.name}.h5ad",
            "counts_source": location,
            "values_rounded": n_rounded,
            **plan.report,
            "counts_left_out": {
                name: int(feature_sums[plan.role == k + 1].sum())
                for k, name in enumerate(plan.categories)
            },
            "counts_total": int(counted_sum),
            "mapped_counts_fraction": round(mapped_sum / counted_sum, 6) if counted_sum else 0.0,
            "genes_out": len(plan.gene_ids),
            "cells_in": len(table),
            "cells_kept": int(kept.sum()),
            "cells_failed": _qc_failures(table, settings),
            "median_total_counts_kept": float(np.median(table["total_counts"].to_numpy()[kept])),
            "median_genes_kept": float(np.median(table["n_genes_by_counts"].to_numpy()[kept])),
            "median_mito_fraction_kept": round(
                float(np.median(table["mito_fraction"].to_numpy()[kept])), 6
            ),
            "nnz": info["nnz"],
            "warnings": warnings,
            "barcode_sketch": barcode_sketch(obs.index),
            "inputs": inputs,
            "h5ad_blake3": blake3(h5ad_path),
            "settings": asdict(settings),
            "format_version": FORMAT_VERSION,
        }
        write_json(qc_path, qc)
    log.info(
        "%s: %s: %d/%d cells kept, %d/%d genes mapped (%.1f%%) from %s, %s",
        dataset,
        path.name,
        qc["cells_kept"],
        qc["cells_in"],
        qc["genes_mapped"],
        qc["genes_counted"],
        100 * qc["mapping_rate"],
        location,
        ", ".join(f"{n} {k} features left out" for k, n in plan.report["features_left_out"].items())
        or "nothing left out",
    )
    return qc


def _blocks(
    reader: CellReader, location: str, block_cells: int, dataset: str, path: Path
) -> Iterator[tuple[int, sp.csr_matrix]]:
    try:
        yield from reader.blocks(location, block_cells)
    except (CscTooLarge, MtxUnordered) as error:
        raise DatasetError(dataset, path, str(error)) from error
    except (OSError, ValueError, KeyError, EOFError, zlib.error) as error:
        # EOFError, zlib.error: a truncated or corrupt gzipped MTX file
        raise DatasetError(
            dataset, path, f"cannot be read (truncated or not a valid file?): {error}"
        ) from error


def _unique_names(names: pd.Index) -> list[str]:
    """Cell names made unique the way anndata does (`name-1`, `name-2`, ...)."""
    import anndata as ad

    return list(ad.utils.make_index_unique(pd.Index(names.astype(str))))


def _output_var(gene_ids: np.ndarray, reference: GeneReference) -> pd.DataFrame:
    table = reference.table.select("gene_id", "gene_name", "gene_type")
    order = pl.DataFrame({"gene_id": gene_ids.astype(str)}).join(
        table, on="gene_id", how="left", maintain_order="left"
    )
    return pd.DataFrame(
        {
            "gene_name": pd.Categorical(order["gene_name"].to_list()),
            "gene_type": pd.Categorical(order["gene_type"].to_list()),
        },
        index=pd.Index(order["gene_id"].to_list()),
    )


def _input_checksums(source: SourceFile) -> list[dict[str, Any]]:
    files = (
        sorted(p for p in source.path.iterdir() if p.is_file())
        if source.path.is_dir()
        else [source.path]
    )
    return [{"file": str(f), "blake3": blake3(f), "bytes": f.stat().st_size} for f in files]


class H5adWriter:
    """The preprocessed h5ad, its X written as the file streams.

    X is a CSR matrix of int32 raw counts in anndata's `csr_matrix` encoding, with resizable
    datasets (anndata can append to it). Entries are buffered and written in chunks of a fixed
    size, so the sequence of HDF5 writes, hence the file's bytes, depends only on the data, not
    on the block size. obs, var and uns are written at the end by anndata's `write_elem`.

    Parameters
    ----------
    path
        The h5ad to create.
    max_nnz
        An upper bound on the non-zeros to be written (the input's stored entries): it fixes
        the chunk size (small files get small chunks) and whether indices need 64 bits.
    max_cells
        An upper bound on the cells to be written (the input's): `indptr` is allocated once.
    """

    CHUNK = 1 << 20

    def __init__(self, path: Path, *, max_nnz: int, max_cells: int) -> None:
        import h5py

        self.handle = h5py.File(path, "w")
        self.handle.attrs["encoding-type"] = "anndata"
        self.handle.attrs["encoding-version"] = "0.1.0"
        self.group = self.handle.create_group("X")
        self.group.attrs["encoding-type"] = "csr_matrix"
        self.group.attrs["encoding-version"] = "0.1.0"
        # scipy wants indices and indptr of one dtype: int32 while it holds, as anndata writes.
        self.index_dtype = np.int32 if max_nnz < 2**31 else np.int64
        self.chunk = int(max(1, min(self.CHUNK, max_nnz)))
        self.datasets = {
            "data": self.group.create_dataset(
                "data", shape=(0,), dtype=np.int32, maxshape=(None,), chunks=(self.chunk,)
            ),
            "indices": self.group.create_dataset(
                "indices",
                shape=(0,),
                dtype=self.index_dtype,
                maxshape=(None,),
                chunks=(self.chunk,),
            ),
        }
        self.buffers = {
            "data": np.empty(self.chunk, dtype=np.int32),
            "indices": np.empty(self.chunk, dtype=self.index_dtype),
        }
        self.filled = 0
        self.written = 0
        self.indptr = np.zeros(max_cells + 1, dtype=np.int64)
        self.n_cells = 0

    def append(self, indptr: np.ndarray, genes: np.ndarray, counts: np.ndarray) -> None:
        """Append a block of cells (CSR arrays over the output genes, `indptr` from 0)."""
        cells = slice(self.n_cells + 1, self.n_cells + len(indptr))
        self.indptr[cells] = np.asarray(indptr[1:], dtype=np.int64) + self.written + self.filled
        self.n_cells += len(indptr) - 1
        position = 0
        while position < len(genes):
            take = min(self.chunk - self.filled, len(genes) - position)
            self.buffers["data"][self.filled : self.filled + take] = counts[
                position : position + take
            ]
            self.buffers["indices"][self.filled : self.filled + take] = genes[
                position : position + take
            ]
            self.filled += take
            position += take
            if self.filled == self.chunk:
                self._flush()

    def _flush(self) -> None:
        for name, dataset in self.datasets.items():
            dataset.resize((self.written + self.filled,))
            dataset[self.written :] = self.buffers[name][: self.filled]
        self.written += self.filled
        self.filled = 0

    def close(self, obs: pd.DataFrame, var: pd.DataFrame, uns: dict[str, Any]) -> None:
        """Write the rest of X, then obs, var and uns."""
        from anndata.io import write_elem

        if self.filled:
            self._flush()
        self.group.attrs["shape"] = np.array([len(obs), len(var)], dtype=np.int64)
        indptr = self.indptr[: self.n_cells + 1].astype(self.index_dtype)
        self.group.create_dataset("indptr", data=indptr, maxshape=(None,))
        write_elem(self.handle, "obs", obs)
        write_elem(self.handle, "var", var)
        write_elem(self.handle, "uns", uns)
        for name in ("layers", "obsm", "obsp", "varm", "varp"):
            write_elem(self.handle, name, {})
        self.handle.close()

    def abort(self) -> None:
        """Close the file if it is still open (after an error; the caller removes it).

        A close that fails too (the disk is full, say) is not raised: it would replace the
        error that brought us here."""
        if self.handle.id.valid:
            with contextlib.suppress(OSError, RuntimeError):
                self.handle.close()


# --- one dataset: its files together ----------------------------------------------------------


@dataclass(frozen=True)
class DatasetOutputs:
    """Where a dataset's aggregation writes."""

    gene_stats: Path
    qc: Path
    qc_plot: Path
    provenance: Path
    shard_manifest: Path


def aggregate_dataset(
    dataset: str,
    species: str,
    path: str | Path,
    file_qc: list[Path],
    file_stats: list[Path],
    shards: list[Path],
    settings: PreprocessSettings,
    outputs: DatasetOutputs,
    *,
    reference_source: str,
    config_slice: dict[str, Any] | None = None,
    exact_max_cells: int = EXACT_MAX_CELLS,
    h5ad_dir: Path | None = None,
) -> dict[str, Any]:
    """Merge the per-file outputs of a dataset: statistics, QC record and figure, provenance,
    and the shard manifest, all written atomically. Outputs of files the dataset no longer has
    (removed from its folder) are deleted, and logged."""
    records = [read_json(p) for p in sorted(file_qc, key=lambda p: p.name)]
    lamin = str(path).startswith("lamin://")
    sources = dataset_sources(dataset, path) if not lamin else None
    qc = {
        "dataset": dataset,
        "species": species,
        "settings": asdict(settings),
        "files": records,
        "ignored": [str(p) for p in sources.ignored] if sources else [],
        "cells_in": sum(r["cells_in"] for r in records),
        "cells_kept": sum(r["cells_kept"] for r in records),
        "genes_mapped": sum(r["genes_mapped"] for r in records),
        "mapping_rate": round(
            sum(r["genes_mapped"] for r in records)
            / max(sum(r["genes_counted"] for r in records), 1),
            6,
        ),
        "shared_barcodes": shared_barcodes(records),
    }
    if sources and sources.ignored:
        log.info(
            "%s: not read (Cell Ranger outputs other than the filtered matrix, other files): %s",
            dataset,
            ", ".join(p.name for p in sources.ignored),
        )
    stats = merge_gene_stats(
        sorted(file_stats, key=lambda p: p.name), exact_max_cells=exact_max_cells
    )
    qc["genes_out"] = int(stats.height)
    with atomic_outputs(
        outputs.gene_stats,
        outputs.qc,
        outputs.qc_plot,
        outputs.provenance,
        outputs.shard_manifest,
    ) as (stats_path, qc_path, plot_path, provenance_path, manifest_path):
        # First: it refuses shards of another format or number of bins, and then nothing of
        # the dataset's outputs may be left.
        write_dataset_manifest(dataset, species, shards, manifest_path)
        write_gene_stats(stats, stats_path)
        write_json(qc_path, qc)
        from cellfoundry.plots import plot_qc

        cells = [
            pl.read_parquet(
                p.with_name(p.name.removesuffix(".json") + ".cells.parquet")
            ).to_pandas()
            for p in sorted(file_qc, key=lambda p: p.name)
        ]
        plot_qc(
            dataset,
            cells,
            settings,
            plot_path,
            warnings=sorted({w for r in records for w in r["warnings"]}),
        )
        write_json(
            provenance_path,
            {
                "dataset": dataset,
                "species": species,
                "inputs": [i for r in records for i in r["inputs"]],
                "outputs": [
                    {"file": r["output"], "blake3": r["h5ad_blake3"], "n_obs": r["cells_kept"]}
                    for r in records
                ],
                "reference": reference_source,
                "config": config_slice if config_slice is not None else asdict(settings),
                "format_version": FORMAT_VERSION,
                "versions": software_versions(),
            },
        )
    remove_obsolete(dataset, [r["file"] for r in records], file_qc, file_stats, shards, h5ad_dir)
    return qc


def remove_obsolete(
    dataset: str,
    names: list[str],
    file_qc: list[Path],
    file_stats: list[Path],
    shards: list[Path],
    h5ad_dir: Path | None,
) -> list[Path]:
    """Delete the per-file outputs of inputs a dataset no longer has (a file removed from its
    folder), so that its `h5ads/` folder lists only its current files; returns what went."""
    keep = set(names)
    candidates: list[Path] = []
    if file_qc:
        folder = file_qc[0].parent
        candidates += [p for p in folder.glob("*.json") if p.stem not in keep]
        candidates += [
            p
            for p in folder.glob("*.cells.parquet")
            if p.name.removesuffix(".cells.parquet") not in keep
        ]
    if file_stats:
        candidates += [p for p in file_stats[0].parent.glob("*.parquet") if p.stem not in keep]
    if shards:
        candidates += [p for p in shards[0].parent.iterdir() if p.is_dir() and p.name not in keep]
    if h5ad_dir is not None and h5ad_dir.is_dir():
        candidates += [p for p in h5ad_dir.glob("*.h5ad") if p.stem not in keep]
    for path in sorted(candidates):
        remove(path)
        log.info("%s: removed %s (its input is no longer part of the dataset)", dataset, path)
    return candidates


def shared_barcodes(records: list[dict[str, Any]], *, threshold: float = 0.5) -> list[list[str]]:
    """Groups of files that share most of their cell barcodes (estimated from their sketches).

    Two files are grouped when the estimated share of the smaller file's kept cells also found
    in the other is at least `threshold`: the same cells read twice must never be split
    between training and validation.
    """
    names = [r["file"] for r in records]
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    sketches = [np.asarray(r["barcode_sketch"], dtype=np.uint64) for r in records]
    sizes = [r["cells_kept"] for r in records]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if containment(sketches[i], sketches[j], sizes[i], sizes[j]) >= threshold:
                parent[find(i)] = find(j)
    groups: dict[int, list[str]] = {}
    for i, name in enumerate(names):
        groups.setdefault(find(i), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def containment(a: np.ndarray, b: np.ndarray, size_a: int, size_b: int) -> float:
    """Estimated share of the smaller set's members found in the other, from bottom-k sketches.

    Among the k smallest hashes of the union, the share present in both estimates the Jaccard
    index J (Broder 1997); then |A and B| = J (|A| + |B|) / (1 + J), divided by the smaller size.
    """
    if not len(a) or not len(b):
        return 0.0
    k = min(len(a), len(b))
    union = np.union1d(a, b)[:k]
    jaccard = len(np.intersect1d(np.intersect1d(a, b), union)) / len(union)
    shared = jaccard * (size_a + size_b) / (1 + jaccard)
    return min(1.0, shared / max(1, min(size_a, size_b)))


def software_versions() -> dict[str, str]:
    """Versions of the software that shaped the outputs."""
    from importlib.metadata import version

    packages = ("anndata", "numpy", "scipy", "h5py", "numba", "polars", "pandas")
    return {"cellfoundry": __version__, "python": platform.python_version()} | {
        name: version(name) for name in packages
    }


def read_dataset_files(dataset: str, path: str | Path) -> dict[str, SourceFile]:
    """The inputs of a dataset by output name (see `cellfoundry.sources`)."""
    return dataset_sources(dataset, path).by_name()
