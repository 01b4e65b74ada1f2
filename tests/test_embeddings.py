"""Gene-embedding methods: co-expression from the corpus, and the plug-in methods that read a
local Hugging Face model (protein language model, text), with tiny models made here."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cellfoundry.embeddings import EmbeddingInputs, read_csv, resolve_method, write_csv
from cellfoundry.embeddings.coexpression import ppmi_svd
from cellfoundry.shards import shard_folders
from cellfoundry.vocabulary import from_genes, read_token_mapping


def inputs_for(corpus, species: str, seed: int = 0) -> EmbeddingInputs:
    shards = [
        folder
        for name, d in sorted(corpus["datasets"].items())
        if d.species == species
        for folder in shard_folders(corpus["project"] / "shards" / name)
    ]
    mapping = read_token_mapping(species, corpus["token_mappings"][species])
    return EmbeddingInputs(species, mapping, tuple(shards), seed)


def test_coexpression_embeds_co_detected_genes_close(tiny_corpus, tmp_path):
    inputs = inputs_for(tiny_corpus, "hsapiens")
    embed = resolve_method("coexpression")
    result = embed(inputs, {"dim": 8, "min_cells": 10})
    again = embed(inputs, {"dim": 8, "min_cells": 10})
    assert np.array_equal(result.matrix, again.matrix)  # seeded, deterministic
    assert result.gene_ids == inputs.token_mapping.gene_table["gene_id"].to_list()
    assert result.matrix.shape == (len(result.gene_ids), 8)
    assert not result.matrix[~result.embedded].any()  # the zero fallback
    assert 0 < (~result.embedded).sum() < len(result.gene_ids)
    path = tmp_path / "hsapiens.csv"
    write_csv(result, path)
    ids, matrix = read_csv(path)
    assert ids == result.gene_ids
    np.testing.assert_allclose(matrix, result.matrix, rtol=1e-6, atol=1e-6)


def test_ppmi_svd_recovers_a_block_structure():
    # Two groups of genes co-detected within their group only.
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 2, 400)
    detected = np.zeros((400, 10))
    detected[cells == 0, :5] = rng.random(((cells == 0).sum(), 5)) < 0.8
    detected[cells == 1, 5:] = rng.random(((cells == 1).sum(), 5)) < 0.8
    vectors = ppmi_svd(detected.T @ detected, 400, dim=2, seed=1)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    assert similarity[:5, :5].mean() > 0.9 and similarity[5:, 5:].mean() > 0.9
    assert similarity[:5, 5:].mean() < 0.2


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown gene-embedding method 'esm99'"):
        resolve_method("esm99")


@pytest.fixture(scope="module")
def tiny_esm(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("esm")
    vocab = [
        "<cls>",
        "<pad>",
        "<eos>",
        "<unk>",
        *"LAGVSERTIDPKQNFYMHWCXBUZO",
        ".",
        "-",
        "<null_1>",
        "<mask>",
    ]
    (folder / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = transformers.EsmTokenizer(str(folder / "vocab.txt"))
    config = transformers.EsmConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, pad_token_id=1, mask_token_id=len(vocab) - 1,
    )  # fmt: skip
    transformers.EsmModel(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    return folder / "model"


def test_protein_language_model_embeds_genes_with_proteins(tiny_corpus, tiny_esm, tmp_path):
    inputs = inputs_for(tiny_corpus, "mmusculus")
    genes = inputs.token_mapping.gene_table["gene_id"].to_list()
    fasta = tmp_path / "proteins.fa"
    # Ensembl peptide headers; the first gene has two isoforms, one record names no known gene.
    fasta.write_text(
        f">ENSMUSP01.1 pep gene:{genes[0]}.3 transcript:T1\nMKTAYIAKQR\nQISFVKSHFS\n"
        f">ENSMUSP02.1 pep gene:{genes[0]}.3 transcript:T2\nMKTAYIAK\n"
        f">ENSMUSP03.1 pep gene:{genes[1]}.1 transcript:T3\nMVLSPADKTN\n"
        ">ENSMUSP04.1 pep gene:ENSMUSG99999999999.1 transcript:T4\nMAAAA\n"
    )
    embed = resolve_method("protein_lm")
    result = embed(inputs, {"model": str(tiny_esm), "sequences": {"mmusculus": str(fasta)}})
    assert result.dim == 16
    assert result.embedded[:2].all() and result.embedded.sum() == 2
    assert not np.allclose(result.matrix[0], result.matrix[1])
    # the isoforms' mean
    from cellfoundry.embeddings._hf import mean_pooled

    isoforms = mean_pooled(tiny_esm, ["MKTAYIAKQRQISFVKSHFS", "MKTAYIAK"])
    np.testing.assert_allclose(result.matrix[0], isoforms.mean(axis=0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no sequences for hsapiens"):
        embed(inputs_for(tiny_corpus, "hsapiens"), {"model": str(tiny_esm), "sequences": {}})


def test_text_embeddings_of_gene_descriptions(tiny_corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "t",
        "cell",
        "receptor",
        "kinase",
        "ribosomal",
        "protein",
    ]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
    )
    transformers.BertModel(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    inputs = inputs_for(tiny_corpus, "hsapiens")
    genes = inputs.token_mapping.gene_table["gene_id"].to_list()
    table = tmp_path / "descriptions.tsv"
    pl.DataFrame(
        {"gene_id": genes[:3], "description": ["t cell receptor", "kinase", "ribosomal protein"]}
    ).write_csv(table, separator="\t")
    result = resolve_method("text")(
        inputs, {"model": str(tmp_path / "model"), "descriptions": {"hsapiens": str(table)}}
    )
    assert result.dim == 8 and result.embedded.sum() == 3 and result.embedded[:3].all()


def test_a_method_can_be_any_module(tmp_path, monkeypatch, human):
    (tmp_path / "myplugins").mkdir()
    (tmp_path / "myplugins" / "__init__.py").write_text("")
    (tmp_path / "myplugins" / "my_embedding.py").write_text(
        "import numpy as np\n"
        "from cellfoundry.embeddings import from_vectors\n"
        "def embed(inputs, settings):\n"
        "    genes = inputs.token_mapping.gene_table['gene_id'].to_list()\n"
        "    return from_vectors(inputs.token_mapping, {g: np.full(settings['dim'], i) for i, g in enumerate(genes[:2])}, settings['dim'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mapping = from_genes(
        "hsapiens", ["ENSG00000000003", "ENSG00000000005", "ENSG00000000419"], human
    )
    result = resolve_method("myplugins.my_embedding")(
        EmbeddingInputs("hsapiens", mapping, (), 0), {"dim": 3}
    )
    assert result.embedded.tolist() == [True, True, False]
    assert result.matrix[1].tolist() == [1, 1, 1]
