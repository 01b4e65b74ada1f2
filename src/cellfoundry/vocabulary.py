"""Stage 3: the token mapping (vocabulary) of a species.

The file is scConcept's `token_mappings_per_specie/<species>.csv`: header
`gene_id,gene_name,token`, `<cls>` = 0 and `<pad>` = 1 with an empty gene_name, then further
special tokens (`<mask>` = 2), then genes with consecutive tokens. A vocabulary is built from
the genes the corpus detects, or imported from an existing token mapping or a Geneformer
vocabulary (`vocab.txt`, or its `token_dictionary_gc*.pkl`).

Geneformer's dictionaries (`token_dictionary_gc*.pkl`, `gene_median_dictionary_gc*.pkl`) are
pickles; :func:`read_geneformer_dictionary` reads them without executing any code from the
file (see :class:`_DictionaryUnpickler`).
"""

from __future__ import annotations

import functools
import math
import pickle
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cellfoundry.errors import ConfigError
from cellfoundry.reference import ENSEMBL_ID, GeneReference

FORMAT_VERSION = 1
CLS, PAD, MASK = "<cls>", "<pad>", "<mask>"
SPECIAL_TOKENS = (CLS, PAD, MASK)
# Special tokens of Geneformer's vocabularies (V1: <pad>, <mask>; V2 adds <cls>, <eos>).
GENEFORMER_SPECIAL = ("<pad>", "<mask>", "<cls>", "<eos>")
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

    @functools.cached_property
    def index(self) -> dict[str, int]:
        """gene_id -> token, built once per mapping (not per shard or gene list)."""
        return dict(
            zip(self.table["gene_id"].to_list(), self.table["token"].to_list(), strict=True)
        )

    def tokens(self, gene_ids: np.ndarray | list[str]) -> np.ndarray:
        """Token id of each gene, -1 for genes outside the vocabulary (they are dropped)."""
        lookup = self.index
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
    then Ensembl IDs, one per line, or its pickled dict `token_dictionary_gc*.pkl`, read by
    :func:`read_geneformer_dictionary`) keeps its gene order but is renumbered to our layout
    (`<cls>`=0, `<pad>`=1, `<mask>`=2, genes from 3).
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
    if _is_pickle(path):
        tokens = read_geneformer_dictionary(path, int)
        # Geneformer's gene order is its token order.
        ordered = sorted(tokens, key=tokens.__getitem__)
        if len(set(tokens.values())) != len(tokens):
            raise ConfigError(f"token dictionary {path}: token ids are not unique")
        lines = ordered
    else:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    genes = [line for line in lines if line not in GENEFORMER_SPECIAL]
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


# --------------------------------------------------------------------------------------------
# Geneformer's pickled dictionaries, read without executing code
# --------------------------------------------------------------------------------------------

# numpy dtype codes of scalars -> struct formats. Geneformer's dictionaries hold numpy
# scalars (int64 token ids, float64 medians in its V1 files) next to plain ints.
_SCALAR_FORMATS = {
    "b1": "?",
    "i1": "b",
    "i2": "h",
    "i4": "i",
    "i8": "q",
    "u1": "B",
    "u2": "H",
    "u4": "I",
    "u8": "Q",
    "f2": "e",
    "f4": "f",
    "f8": "d",
}
_BYTE_ORDERS = {"<": "<", ">": ">", "|": "<", "=": "<" if sys.byteorder == "little" else ">"}
# Where numpy's scalar reconstructor lives: numpy < 2 writes numpy.core, numpy >= 2 numpy._core.
_NUMPY_SCALAR = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}


class _ScalarDType:
    """Stand-in for `numpy.dtype` in a pickle: records a plain numeric dtype, nothing else."""

    def __init__(self, code: object, align: object = False, copy: object = True) -> None:
        if not isinstance(code, str) or code not in _SCALAR_FORMATS:
            raise pickle.UnpicklingError(f"numpy dtype {code!r} is not a plain number")
        self.code = code
        self.order = "="

    def __setstate__(self, state: object) -> None:
        # numpy's dtype state: (version, byte order, subarray, names, fields, ...); a plain
        # number has no subarray, names or fields.
        if not (
            isinstance(state, tuple)
            and len(state) >= 5
            and state[1] in _BYTE_ORDERS
            and state[2] is None
            and state[3] is None
            and state[4] is None
        ):
            raise pickle.UnpicklingError("numpy dtype state is not that of a plain number")
        self.order = state[1]


def _numpy_scalar(dtype: object, data: object) -> int | float | bool:
    """Stand-in for numpy's scalar reconstructor: decode the bytes with `struct`."""
    if not isinstance(dtype, _ScalarDType) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar without a plain dtype and its bytes")
    fmt = _BYTE_ORDERS[dtype.order] + _SCALAR_FORMATS[dtype.code]
    if len(data) != struct.calcsize(fmt):
        raise pickle.UnpicklingError(f"numpy scalar of {len(data)} bytes for dtype {dtype.code}")
    return struct.unpack(fmt, data)[0]


class _DictionaryUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, tuples, strings, numbers and numpy scalars.

    Pickle opcodes for those need no global; any global the file names is refused, except
    numpy's scalar reconstructor and `numpy.dtype`, which are replaced by stand-ins
    (:class:`_ScalarDType`, :func:`_numpy_scalar`) that accept plain numeric dtypes only and
    decode the scalar's bytes with :mod:`struct`. Nothing of numpy (or anything else) is
    called, so a crafted file cannot run code; it can only fail to load.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_SCALAR:
            return _numpy_scalar
        if (module, name) == ("numpy", "dtype"):
            return _ScalarDType
        raise pickle.UnpicklingError(f"it needs {module}.{name}, which is refused")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds persistent ids, which are refused")


def _is_pickle(path: Path) -> bool:
    if path.suffix in (".pkl", ".pickle"):
        return True
    with path.open("rb") as handle:
        return handle.read(1) == b"\x80"  # PROTO opcode: pickle protocol 2 or later


def read_geneformer_dictionary(path: str | Path, value_type: type[int] | type[float]) -> dict:
    """Read a Geneformer dictionary pickle (`token_dictionary_gc*.pkl` with ``int``,
    `gene_median_dictionary_gc*.pkl` with ``float``) without executing code.

    The file must hold one dict of strings to numbers. Its values may be Python numbers or
    numpy scalars (Geneformer's files hold numpy int64 tokens and float64 medians); they are
    returned as Python ``int`` or ``float``.

    Parameters
    ----------
    path
        The pickle.
    value_type
        ``int`` for token ids, ``float`` for medians.

    Returns
    -------
    The dictionary, in the file's order.

    Raises
    ------
    ConfigError
        One line naming the file: it is not a pickle, it names a refused global (anything but
        numpy scalars), it is not a dict of strings to numbers, or a value is not a finite
        number of the requested type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Geneformer dictionary {path} does not exist")
    try:
        with path.open("rb") as handle:
            loaded = _DictionaryUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ConfigError(
            f"Geneformer dictionary {path} cannot be read safely ({err}); only pickled dicts of "
            "strings to numbers (numpy scalars included) are accepted"
        ) from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"Geneformer dictionary {path} holds a {type(loaded).__name__}, not a dict"
        )
    out: dict[str, Any] = {}
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise ConfigError(f"Geneformer dictionary {path}: key {key!r} is not a string")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"Geneformer dictionary {path}: {key} maps to {type(value).__name__} {value!r}, "
                "not a number"
            )
        if value_type is int:
            if value != int(value):
                raise ConfigError(f"Geneformer dictionary {path}: token of {key} is {value!r}")
            out[key] = int(value)
        else:
            if not math.isfinite(value):
                raise ConfigError(f"Geneformer dictionary {path}: median of {key} is {value!r}")
            out[key] = float(value)
    return out


def read_gene_median_dictionary(path: str | Path) -> dict[str, float]:
    """Geneformer's `gene_median_dictionary_gc*.pkl`: Ensembl ID -> non-zero median.

    Read with :func:`read_geneformer_dictionary`; every key must be an Ensembl ID and every
    median positive (Geneformer divides by it).

    Raises
    ------
    ConfigError
        As :func:`read_geneformer_dictionary`, or for a key that is not an Ensembl ID or a
        median that is not positive; one line naming the file.
    """
    medians = read_geneformer_dictionary(path, float)
    bad = [g for g in medians if not ENSEMBL_ID.match(g)]
    if bad:
        raise ConfigError(
            f"gene median dictionary {path}: {len(bad)} keys are not Ensembl IDs, e.g. {bad[0]!r}"
        )
    non_positive = [g for g, m in medians.items() if not m > 0]
    if non_positive:
        raise ConfigError(
            f"gene median dictionary {path}: {len(non_positive)} medians are not positive, "
            f"e.g. {non_positive[0]} = {medians[non_positive[0]]!r}"
        )
    return medians
