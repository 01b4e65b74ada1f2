"""Stage 4: gene panels of a species (`panels/<species>/<panel>.csv`, column `Ensembl_ID`).

scConcept draws one contrastive view of a cell from a predesigned panel. We compute a
highly-variable-genes panel from the species' corpus and validate users' panels.

The HVG panel follows scanpy's `flavor='seurat'` (Satija et al. 2015): genes are binned by
log mean of normalised expression and ranked by their dispersion (var/mean, log) normalised
within the bin. scanpy computes it from an in-memory matrix; a corpus of hundreds of datasets
does not fit, so we compute the same formula from the merged per-gene moments
(`gene_stats`). On a single dataset the result equals scanpy's (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from cellfoundry.errors import ConfigError
from cellfoundry.reference import ENSEMBL_ID, GeneReference, symbol_index
from cellfoundry.vocabulary import TokenMapping

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Panel:
    """A named gene panel and the entries of its source that could not be used."""

    name: str
    species: str
    table: pl.DataFrame  # Ensembl_ID, gene_name
    unknown: list[str]

    def report(self) -> dict[str, object]:
        return {
            "panel": self.name,
            "species": self.species,
            "n_genes": self.table.height,
            "n_unknown": len(self.unknown),
            "unknown": self.unknown,
        }


def seurat_dispersions(mean: np.ndarray, var: np.ndarray, *, n_bins: int = 20) -> np.ndarray:
    """Normalised dispersions as scanpy's `highly_variable_genes(flavor='seurat')` computes them.

    `mean` and `var` (ddof=1) are of normalised, not log-transformed, expression.
    """
    mean = np.array(mean, dtype=np.float64)
    mean[mean == 0] = 1e-12
    dispersion = np.asarray(var, dtype=np.float64) / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(dispersion)
    frame = pd.DataFrame({"means": np.log1p(mean), "dispersions": dispersion})
    frame["mean_bin"] = pd.cut(frame["means"], bins=n_bins)
    stats = frame.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    # A bin holding a single gene has no spread: scanpy gives it a normalised dispersion of 1.
    single = stats["dev"].isnull()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0
    per_gene = stats.loc[frame["mean_bin"]].set_index(frame.index)
    return ((frame["dispersions"] - per_gene["avg"]) / per_gene["dev"]).to_numpy()


def hvg_panel(
    species: str,
    summary: pl.DataFrame,
    mapping: TokenMapping,
    *,
    n_top_genes: int,
    n_bins: int = 20,
) -> Panel:
    """The `n_top_genes` most variable genes of the vocabulary (ties broken by Ensembl ID).

    `summary` is `gene_stats.summarize` of the species' merged statistics.
    """
    genes = mapping.gene_table.select("gene_id", "gene_name")
    table = genes.join(summary, on="gene_id", how="inner").sort("gene_id")
    norm = seurat_dispersions(table["mean"].to_numpy(), table["var"].to_numpy(), n_bins=n_bins)
    score = np.nan_to_num(norm, nan=-np.inf)
    order = np.lexsort((table["gene_id"].to_numpy(), -score))
    chosen = np.sort(order[: min(n_top_genes, table.height)])
    out = table[chosen].select(pl.col("gene_id").alias("Ensembl_ID"), "gene_name")
    return Panel("hvg", species, out, [])


def user_panel(
    name: str, species: str, path: str | Path, reference: GeneReference, mapping: TokenMapping
) -> Panel:
    """A user's panel (CSV with `Ensembl_ID`, or `gene_id`, or a symbol column), validated.

    Entries that are not genes of the species' vocabulary are reported, not kept.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"panel '{name}' for {species}: file does not exist: {path}")
    frame = pl.read_csv(path, infer_schema_length=0)
    column = next((c for c in ("Ensembl_ID", "gene_id", "ensembl_id") if c in frame.columns), None)
    if column is not None:
        entries = [str(v).strip() for v in frame[column].drop_nulls().to_list()]
        ids = [e.split(".")[0] if ENSEMBL_ID.match(e) else None for e in entries]
    else:
        column = next(
            (c for c in ("gene_name", "symbol", "gene_symbol", "Gene") if c in frame.columns), None
        )
        if column is None:
            raise ConfigError(
                f"panel '{name}' ({path}): needs an Ensembl_ID column (or gene_id, or a gene_name/symbol column)"
            )
        index = symbol_index(reference)
        entries = [str(v).strip() for v in frame[column].drop_nulls().to_list()]
        ids = [index.get(e, index.get(e.upper())) for e in entries]
    vocabulary = mapping.gene_table.select("gene_id", "gene_name")
    known = set(vocabulary["gene_id"].to_list())
    unknown = sorted({e for e, g in zip(entries, ids, strict=True) if g is None or g not in known})
    chosen = sorted({g for g in ids if g is not None and g in known})
    if not chosen:
        raise ConfigError(
            f"panel '{name}' ({path}): none of its {len(entries)} genes is in the {species} vocabulary"
        )
    out = (
        vocabulary.filter(pl.col("gene_id").is_in(chosen))
        .sort("gene_id")
        .rename({"gene_id": "Ensembl_ID"})
    )
    return Panel(name, species, out, unknown)


def write_panel(panel: Panel, path: str | Path) -> None:
    panel.table.write_csv(path)
