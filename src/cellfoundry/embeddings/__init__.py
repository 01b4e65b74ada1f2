"""Gene-embedding generation: one CSV per species and method, scConcept's pretrained vocabulary.

Output: `references/embeddings/<name>/<species>.csv`, one row per gene of the species'
vocabulary keyed by Ensembl ID (`gene_id`), then one column per dimension (`0`, `1`, ...).
scConcept reads it with `pandas.read_csv(path, index_col=0)` and maps it to the model width
with a linear adapter.

A method is a module with a function ``embed(inputs: EmbeddingInputs, settings: dict) ->
GeneEmbeddings``. Built-in methods live in this package (`coexpression`, `protein_lm`,
`text`) and are named by their short name in the config; any importable module works too
(``method: mypackage.my_embedding``), so adding a method is a new module and a config entry.

Fallback: genes of the vocabulary that a method cannot embed (never co-expressed, no protein
sequence, no description) get a zero vector, as scConcept does for genes missing from its
pretrained vocabulary. The model's own trainable gene embedding then carries them alone.
Their number is reported next to the CSV.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from cellfoundry.vocabulary import TokenMapping

FORMAT_VERSION = 1


@dataclass(frozen=True)
class EmbeddingInputs:
    """What a method may use: the species' vocabulary, the shards of its datasets, a seed."""

    species: str
    token_mapping: TokenMapping
    shards: tuple[Path, ...]
    seed: int


@dataclass
class GeneEmbeddings:
    """Embeddings of every vocabulary gene, in token order; `embedded` is False for fallbacks."""

    gene_ids: list[str]
    matrix: np.ndarray
    embedded: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def report(self) -> dict[str, Any]:
        return {
            "n_genes": len(self.gene_ids),
            "n_embedded": int(self.embedded.sum()),
            "n_fallback": int((~self.embedded).sum()),
            "dim": self.dim,
            "fallback": "zero vector",
        }


class Method(Protocol):
    def __call__(self, inputs: EmbeddingInputs, settings: dict[str, Any]) -> GeneEmbeddings: ...


def resolve_method(name: str) -> Method:
    """The `embed` function of a built-in method (short name) or of an importable module."""
    module_name = name if "." in name else f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"unknown gene-embedding method '{name}' (no module {module_name})"
        ) from error
    if not hasattr(module, "embed"):
        raise ValueError(
            f"gene-embedding module {module_name} has no embed(inputs, settings) function"
        )
    return module.embed


def from_vectors(mapping: TokenMapping, vectors: dict[str, np.ndarray], dim: int) -> GeneEmbeddings:
    """Place per-gene vectors in vocabulary order, zeros for genes without one."""
    gene_ids = mapping.gene_table["gene_id"].to_list()
    matrix = np.zeros((len(gene_ids), dim), dtype=np.float32)
    embedded = np.zeros(len(gene_ids), dtype=bool)
    for row, gene in enumerate(gene_ids):
        vector = vectors.get(gene)
        if vector is not None:
            matrix[row] = vector
            embedded[row] = True
    return GeneEmbeddings(gene_ids, matrix, embedded)


def write_csv(embeddings: GeneEmbeddings, path: str | Path) -> None:
    """Write the scConcept CSV (`gene_id`, then one column per dimension)."""
    columns = {"gene_id": embeddings.gene_ids}
    columns |= {str(d): embeddings.matrix[:, d] for d in range(embeddings.dim)}
    pl.DataFrame(columns).write_csv(path, float_precision=7)


def read_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Gene IDs and the embedding matrix of a gene-embedding CSV (ours or scConcept's)."""
    frame = pl.read_csv(path, infer_schema_length=0)
    ids = frame[frame.columns[0]].to_list()
    matrix = frame.select(frame.columns[1:]).cast(pl.Float32).to_numpy()
    return ids, matrix
