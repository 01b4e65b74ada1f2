"""Geneformer rank tokens of the real files equal Geneformer's rule with exact medians.

Geneformer's tokenizer (Theodoris et al. 2023, `TranscriptomeTokenizer`): each gene's value is
count / n_counts x 10,000 / the gene's non-zero median over the corpus; genes are sorted by it,
descending, and the first 2,048 are the cell. The reference below is written by hand from
that rule, with medians computed by `np.median` over every non-zero value of the file (the
corpus here), and ties (equal values) broken by ascending token id, the documented rule of
`discretize.rank_order` (Geneformer's own `np.argsort(-x)` leaves ties to an unstable sort).
The pipeline's tokens come from its streamed statistics, the shard and the loader.
"""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from cellfoundry.gene_stats import summarize
from cellfoundry.loader import ShardCollection
from cellfoundry.preprocess import PreprocessSettings
from cellfoundry.vocabulary import from_genes
from prep import preprocess_path

# file: (species, QC settings); e18 keeps 1,000 genes per cell at most.
REAL = {
    "human_pbmc1k_10x_cellranger6.h5": ("hsapiens", PreprocessSettings()),
    "human_pbmc5k_protein_v3_200cells.h5ad": ("hsapiens", PreprocessSettings()),
    "mouse_sympathetic_furlan2016.loom": ("mmusculus", PreprocessSettings()),
    "mouse_e18_brain_10k_cells_1000genes.h5ad": (
        "mmusculus",
        PreprocessSettings(min_genes=20, min_counts=50),
    ),
}
MAX_LEN = 2_048


def reference_tokens(X: sp.csr_matrix, total: np.ndarray, tokens_of_genes: np.ndarray) -> list:
    """Geneformer's rule by hand: exact medians, count / n_counts * 10,000 / median, ranked."""
    values = sp.csr_matrix(
        (
            X.data / total[np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))] * 10_000,
            X.indices,
            X.indptr,
        ),
        shape=X.shape,
    ).tocsc()
    medians = np.array(
        [np.median(values.data[values.indptr[g] : values.indptr[g + 1]]) for g in range(X.shape[1])]
    )
    cells = []
    for row in range(X.shape[0]):
        lo, hi = X.indptr[row], X.indptr[row + 1]
        genes = X.indices[lo:hi]
        value = X.data[lo:hi] / total[row] * 10_000 / medians[genes]
        token = tokens_of_genes[genes]
        order = np.lexsort((token, -value))[:MAX_LEN]
        cells.append(token[order].tolist())
    return cells


@pytest.mark.parametrize("file", sorted(REAL))
def test_rank_tokens_equal_geneformers_rule_with_exact_medians(
    shared_data, human, mouse, tmp_path, file
):
    species, settings = REAL[file]
    reference = human if species == "hsapiens" else mouse
    # Enough exact values for every gene of these files: medians are exact, not histograms.
    qc, outputs = preprocess_path(
        shared_data / file, reference, tmp_path, settings, species=species, exact_max_cells=20_000
    )
    summary = summarize(pl.read_parquet(outputs.gene_stats))
    assert summary.filter(pl.col("n_cells") > 0)["median_exact"].all()
    adata = ad.read_h5ad(outputs.h5ad)
    mapping = from_genes(species, sorted(adata.var_names), reference)
    collection = ShardCollection([outputs.shard], {species: mapping}, medians={species: summary})
    batch = collection.gather(np.arange(len(collection)))
    offsets, ranked = collection.rank_batch(batch, max_len=MAX_LEN)
    ours = [ranked[a:b].tolist() for a, b in itertools.pairwise(offsets)]

    X = sp.csr_matrix(adata.X, dtype=np.float64)
    expected = reference_tokens(
        X, adata.obs["total_counts"].to_numpy(np.float64), mapping.tokens(adata.var_names)
    )
    assert len(ours) == len(expected) == qc["cells_kept"]
    differing = sum(a != b for a, b in zip(ours, expected, strict=True))
    assert differing == 0, f"{differing} of {len(ours)} cells differ"
    assert max(len(cell) for cell in ours) == min(MAX_LEN, max(np.diff(X.indptr)))
