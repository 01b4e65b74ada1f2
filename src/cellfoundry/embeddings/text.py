"""Gene embeddings from text: a language model's embedding of each gene's description.

Settings:

- `model`: a local Hugging Face encoder directory (a sentence-embedding model such as
  all-MiniLM-L6-v2 works well);
- `descriptions`: species -> TSV with columns `gene_id` and `description` (e.g. NCBI Gene
  summaries or UniProt function text);
- `max_length` (256) and `batch_size` (32).

Genes without a description get the zero fallback.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from cellfoundry.embeddings import EmbeddingInputs, GeneEmbeddings, from_vectors
from cellfoundry.embeddings._hf import mean_pooled


def embed(inputs: EmbeddingInputs, settings: dict[str, Any]) -> GeneEmbeddings:
    path = settings["descriptions"].get(inputs.species)
    if path is None:
        raise ValueError(
            f"text: no descriptions for {inputs.species} (settings.descriptions.{inputs.species})"
        )
    table = (
        pl.read_csv(path, separator="\t", infer_schema_length=0)
        .select("gene_id", "description")
        .drop_nulls()
    )
    vocabulary = set(inputs.token_mapping.gene_table["gene_id"].to_list())
    table = table.filter(pl.col("gene_id").is_in(vocabulary)).unique(
        "gene_id", keep="first", maintain_order=True
    )
    pooled = mean_pooled(
        settings["model"],
        table["description"].to_list(),
        batch_size=settings.get("batch_size", 32),
        max_length=settings.get("max_length", 256),
    )
    vectors = dict(zip(table["gene_id"].to_list(), pooled, strict=True))
    return from_vectors(inputs.token_mapping, vectors, pooled.shape[1])
