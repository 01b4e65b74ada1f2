"""Gene embeddings from a protein language model (e.g. ESM-2) with local weights and sequences.

scConcept's published gene embeddings are ESM2-t30 (640 dims) embeddings of each gene's
protein. Settings:

- `model`: a local Hugging Face model directory (e.g. a copy of `facebook/esm2_t30_150M_UR50D`);
- `sequences`: species -> protein FASTA. The gene of a record is its `gene:<Ensembl ID>` field
  (Ensembl peptide FASTA headers) or else its first word;
- `max_length` (1024) and `batch_size` (16).

A gene's vector is the mean over its proteins (isoforms) of the mean-pooled last hidden state.
Genes without a protein (non-coding) get the zero fallback.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from cellfoundry.embeddings import EmbeddingInputs, GeneEmbeddings, from_vectors
from cellfoundry.embeddings._hf import mean_pooled

GENE_FIELD = re.compile(r"\bgene:(ENS[A-Z]*GR?\d+)")


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """(gene_id, sequence) records of a FASTA file."""
    records: list[tuple[str, str]] = []
    header, chunks = None, []
    for line in Path(path).read_text().splitlines():
        if line.startswith(">"):
            if header is not None:
                records.append((header, "".join(chunks)))
            match = GENE_FIELD.search(line)
            header = match.group(1) if match else line[1:].split()[0].split(".")[0]
            chunks = []
        elif line.strip():
            chunks.append(line.strip())
    if header is not None:
        records.append((header, "".join(chunks)))
    return records


def embed(inputs: EmbeddingInputs, settings: dict[str, Any]) -> GeneEmbeddings:
    fasta = settings["sequences"].get(inputs.species)
    if fasta is None:
        raise ValueError(
            f"protein_lm: no sequences for {inputs.species} (settings.sequences.{inputs.species})"
        )
    vocabulary = set(inputs.token_mapping.gene_table["gene_id"].to_list())
    records = [(gene, seq) for gene, seq in read_fasta(fasta) if gene in vocabulary and seq]
    pooled = mean_pooled(
        settings["model"],
        [seq for _, seq in records],
        batch_size=settings.get("batch_size", 16),
        max_length=settings.get("max_length", 1024),
    )
    by_gene: dict[str, list[np.ndarray]] = defaultdict(list)
    for (gene, _), vector in zip(records, pooled, strict=True):
        by_gene[gene].append(vector)
    vectors = {gene: np.mean(vs, axis=0) for gene, vs in by_gene.items()}
    return from_vectors(inputs.token_mapping, vectors, pooled.shape[1])
