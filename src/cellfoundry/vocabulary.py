"""Stage 3: the token mapping (vocabulary) of a species.

The file is scConcept's `token_mappings_per_specie/<species>.csv`: header
`gene_id,gene_name,token`, `<cls>` = 0 and `<pad>` = 1 with an empty gene_name, then further
special tokens (`<mask>` = 2), then genes with consecutive tokens. A vocabulary is built from
the genes the corpus detects, or imported from an existing token mapping or a Geneformer
vocabulary file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from cellfoundry.errors import ConfigError
from cellfoundry.reference import ENSEMBL_ID, GeneReference

FORMAT_VERSION = 1
CLS, PAD, MASK = "<cls>", "<pad>", "<mask>"
SPECIAL_TOKENS = (CLS, PAD, MASK)
COLUMNS = ["gene_id", "gene_name", "token"]


@dataclass(frozen=True)
class TokenMapping:
    """Token ids of a species' special tokens and genes."""

    species: str
    table: pl.DataFrame  # gene_id, gene_name, token; sorted by token

    @property
    def cls_id(self) -> int:
        return self.token_of(CLS)

    @property
    def pad_id(self) -> int:
        return self.token_of(PAD)

    @property
    def mask_id(self) -> int:
        return self.token_of(MASK)

    @property
    def n_tokens(self) -> int:
        """Size of the embedding table: largest token + 1."""
        return int(self.table["token"].max()) + 1

    @property
    def gene_table(self) -> pl.DataFrame:
        """Rows of genes only (no special tokens)."""
        return self.table.filter(~pl.col("gene_id").is_in(list(SPECIAL_TOKENS)))

    def token_of(self, gene_id: str) -> int:
        row = self.table.filter(pl.col("gene_id") == gene_id)
        if row.height == 0:
            raise KeyError(f"{gene_id} is not in the {self.species} token mapping")
        return int(row["token"][0])

    def tokens(self, gene_ids: np.ndarray | list[str]) -> np.ndarray:
        """Token id of each gene, -1 for genes outside the vocabulary (they are dropped)."""
        lookup = dict(
            zip(self.table["gene_id"].to_list(), self.table["token"].to_list(), strict=True)
        )
        return np.array([lookup.get(str(g), -1) for g in gene_ids], dtype=np.int32)


def from_genes(species: str, gene_ids: list[str], reference: GeneReference | None) -> TokenMapping:
    """Special tokens first, then `gene_ids` in the order given."""
    names = {}
    if reference is not None:
        names = dict(
            zip(
                reference.table["gene_id"].to_list(),
                reference.table["gene_name"].to_list(),
                strict=True,
            )
        )
    rows = [(token, "", i) for i, token in enumerate(SPECIAL_TOKENS)]
    offset = len(SPECIAL_TOKENS)
    rows += [(g, names.get(g, ""), offset + i) for i, g in enumerate(gene_ids)]
    return TokenMapping(species, _frame(rows))


def build_vocabulary(
    species: str, stats: pl.DataFrame, reference: GeneReference, *, min_cells: int = 1
) -> TokenMapping:
    """Genes detected in at least `min_cells` cells of the species' corpus, sorted by Ensembl ID.

    `stats` is the merged gene statistics of the species (`gene_stats.merge_gene_stats`).
    Sorting by ID makes the mapping independent of dataset order and of file contents order.
    """
    genes = stats.filter(pl.col("n_cells") >= min_cells).sort("gene_id")["gene_id"].to_list()
    if not genes:
        raise ConfigError(
            f"no {species} gene is detected in at least {min_cells} cells; lower vocabulary.min_cells"
        )
    return from_genes(species, genes, reference)


def import_token_mapping(
    species: str, path: str | Path, reference: GeneReference | None
) -> TokenMapping:
    """An existing token mapping CSV (scConcept format), or a Geneformer vocabulary file.

    A CSV keeps its token ids, so models trained with it stay compatible; `<mask>` is appended
    after the last token if the file has none. A Geneformer vocabulary (`<pad>`, `<mask>`,
    then Ensembl IDs, one per line, or its pickled dict) keeps its gene order but is renumbered
    to our layout (`<cls>`=0, `<pad>`=1, `<mask>`=2, genes from 3).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"vocabulary file for '{species}' does not exist: {path}")
    if path.suffix == ".csv":
        table = pl.read_csv(
            path, schema_overrides={"gene_id": pl.Utf8, "gene_name": pl.Utf8, "token": pl.Int64}
        )
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise ConfigError(f"token mapping {path} lacks column(s) {', '.join(missing)}")
        table = table.select(COLUMNS).with_columns(pl.col("gene_name").fill_null(""))
        for name, token in ((CLS, 0), (PAD, 1)):
            row = table.filter(pl.col("gene_id") == name)
            if row.height != 1 or int(row["token"][0]) != token:
                raise ConfigError(f"token mapping {path}: {name} must be token {token}")
        if table["token"].n_unique() != table.height or table["gene_id"].n_unique() != table.height:
            raise ConfigError(f"token mapping {path}: tokens and gene_ids must be unique")
        if MASK not in table["gene_id"].to_list():
            table = pl.concat([table, _frame([(MASK, "", int(table["token"].max()) + 1)])])
        return TokenMapping(species, table.sort("token"))
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    genes = [line for line in lines if line not in ("<pad>", "<mask>", "<cls>", "<eos>")]
    bad = [g for g in genes if not ENSEMBL_ID.match(g)]
    if bad:
        raise ConfigError(
            f"vocabulary {path}: {len(bad)} entries are not Ensembl IDs, e.g. {bad[0]!r}"
        )
    return from_genes(species, genes, reference)


def write_token_mapping(mapping: TokenMapping, path: str | Path) -> None:
    mapping.table.select(COLUMNS).write_csv(path)


def read_token_mapping(species: str, path: str | Path) -> TokenMapping:
    table = pl.read_csv(
        path, schema_overrides={"gene_id": pl.Utf8, "gene_name": pl.Utf8, "token": pl.Int64}
    )
    return TokenMapping(
        species, table.with_columns(pl.col("gene_name").fill_null("")).sort("token")
    )


def _frame(rows: list[tuple[str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows, schema={"gene_id": pl.Utf8, "gene_name": pl.Utf8, "token": pl.Int64}, orient="row"
    )
