"""Gene embeddings from the corpus itself: truncated SVD of a PPMI co-expression matrix.

Co-detection counts C[i, j] (cells expressing both genes i and j) are accumulated over the
species' training shards, turned into positive pointwise mutual information

    PPMI[i, j] = max(log(C[i, j] N / (n_i n_j)) - log(shift), 0),

and factorised by a truncated eigen-decomposition of the symmetric PPMI matrix (an SVD of a
symmetric matrix), keeping the leading `dim` components scaled by the square root of their
eigenvalues (Levy & Goldberg 2014's SVD of PPMI, as gene2vec-like methods use on expression).

The `max_genes` most frequently detected genes are embedded (the co-occurrence matrix is
dense); the others get the documented zero fallback. Cells are subsampled to `max_cells`
with a seeded choice, so the result depends on the seed and the corpus only.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

from cellfoundry.embeddings import EmbeddingInputs, GeneEmbeddings, from_vectors
from cellfoundry.loader import ShardCollection
from cellfoundry.seeds import derive_seed

log = logging.getLogger(__name__)

DEFAULTS = {
    "dim": 64,
    "max_genes": 4096,
    "max_cells": 200_000,
    "min_cells": 5,
    "shift": 1.0,
    "chunk_cells": 4096,
}


def embed(inputs: EmbeddingInputs, settings: dict[str, Any]) -> GeneEmbeddings:
    """Embed the species' genes by their co-expression across the corpus."""
    settings = DEFAULTS | settings
    mapping = inputs.token_mapping
    collection = ShardCollection(list(inputs.shards), {inputs.species: mapping})
    rng = np.random.default_rng(
        derive_seed(inputs.seed, "embeddings", "coexpression", inputs.species)
    )
    n_cells = len(collection)
    cells = np.arange(n_cells)
    if n_cells > settings["max_cells"]:
        cells = np.sort(rng.choice(n_cells, settings["max_cells"], replace=False))

    detected = np.zeros(mapping.n_tokens, dtype=np.int64)
    for chunk in _chunks(cells, settings["chunk_cells"]):
        detected += np.bincount(collection.gather(chunk).tokens, minlength=mapping.n_tokens)
    candidates = np.flatnonzero(detected >= settings["min_cells"])
    # Most detected first, ties by token id: deterministic.
    order = np.lexsort((candidates, -detected[candidates]))
    chosen = np.sort(candidates[order[: settings["max_genes"]]])
    dim = int(settings["dim"])
    if len(chosen) <= dim:
        raise ValueError(
            f"{inputs.species}: only {len(chosen)} genes are detected in >= {settings['min_cells']} cells; "
            f"need more than dim={dim}"
        )
    column = np.full(mapping.n_tokens, -1, dtype=np.int64)
    column[chosen] = np.arange(len(chosen))

    cooccurrence = np.zeros((len(chosen), len(chosen)), dtype=np.float64)
    start, done = time.perf_counter(), 0
    for chunk in _chunks(cells, settings["chunk_cells"]):
        batch = collection.gather(chunk)
        cols = column[batch.tokens]
        rows = np.repeat(np.arange(len(batch)), batch.lengths)
        keep = cols >= 0
        X = sp.csr_matrix(
            (np.ones(int(keep.sum()), dtype=np.float64), (rows[keep], cols[keep])),
            shape=(len(batch), len(chosen)),
        )
        cooccurrence += (X.T @ X).toarray()
        done += len(chunk)
        log.info(
            "%s: co-expression %d/%d cells (%.0f cells/s)",
            inputs.species,
            done,
            len(cells),
            done / max(time.perf_counter() - start, 1e-9),
        )
    log.info("%s: co-expression of %d genes over %d cells", inputs.species, len(chosen), len(cells))

    vectors = ppmi_svd(
        cooccurrence,
        len(cells),
        dim=dim,
        shift=settings["shift"],
        seed=derive_seed(inputs.seed, "svd", inputs.species),
    )
    gene_of_token = dict(
        zip(mapping.table["token"].to_list(), mapping.table["gene_id"].to_list(), strict=True)
    )
    return from_vectors(
        mapping, {gene_of_token[int(t)]: vectors[i] for i, t in enumerate(chosen)}, dim
    )


def ppmi_svd(
    cooccurrence: np.ndarray, n_cells: int, *, dim: int, shift: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Leading `dim` components of the PPMI matrix of a co-occurrence matrix (diagonal = counts).

    Returns one row per gene: eigenvectors scaled by sqrt(eigenvalue), signs fixed so the
    largest-magnitude entry of each component is positive (eigensolvers choose signs freely).
    """
    counts = np.diag(cooccurrence).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(cooccurrence * n_cells / np.outer(counts, counts)) - np.log(shift)
    ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0)
    np.fill_diagonal(ppmi, 0.0)
    v0 = np.random.default_rng(seed).standard_normal(len(ppmi))
    values, vectors = eigsh(ppmi, k=dim, which="LA", v0=v0)
    order = np.argsort(-values)
    values, vectors = np.maximum(values[order], 0.0), vectors[:, order]
    flip = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    return (vectors * flip * np.sqrt(values)).astype(np.float32)


def _chunks(cells: np.ndarray, size: int):
    for start in range(0, len(cells), size):
        yield cells[start : start + size]
