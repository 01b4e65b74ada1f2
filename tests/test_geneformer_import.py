"""Geneformer's pickled dictionaries: read without executing code, and imported medians that
reproduce Geneformer's own tokenization (issue 13, point 10)."""

from __future__ import annotations

import os
import pickle
from itertools import pairwise
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import pytest
import scipy.sparse as sp

from cellfoundry import loader, vocabulary
from cellfoundry.cli import main
from cellfoundry.errors import ConfigError
from cellfoundry.gene_stats import (
    compute_gene_stats,
    merge_gene_stats,
    summarize,
    with_imported_medians,
)
from cellfoundry.shards import write_shard

# Six real human genes (GENCODE IDs): TP53, ACTB, GAPDH, CD3D, CD79A, PPBP.
G1, G2, G3, G4, G5, G6 = (
    "ENSG00000141510",
    "ENSG00000075624",
    "ENSG00000111640",
    "ENSG00000167286",
    "ENSG00000105369",
    "ENSG00000163736",
)
ABSENT = "ENSG00000000003"  # TSPAN6: in the median dictionary, not in the corpus


def numpy1_pickle(obj: object) -> bytes:
    """A pickle as numpy < 2 writes it, like Geneformer's V1 files: protocol 4, scalars
    through `numpy.core.multiarray.scalar` (numpy >= 2 writes `numpy._core.multiarray`).
    The module name is a length-prefixed string written once, in the first frame: rename it
    and shorten that frame by the byte saved."""
    data = pickle.dumps(obj, protocol=4)
    old, new = b"\x8c\x16numpy._core.multiarray", b"\x8c\x15numpy.core.multiarray"
    end = 11 + int.from_bytes(data[3:11], "little")
    assert data[2:3] == b"\x95" and data.count(old) == 1 and old in data[11:end]
    first = data[11:end].replace(old, new)
    return data[:3] + len(first).to_bytes(8, "little") + first + data[end:]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


TOKENS = {"<pad>": 0, "<mask>": 1, G2: 2, G3: 3, G1: 4, G4: 5, G5: 6, G6: 7}
MEDIANS = {G1: 0.5, G2: 20.0, G3: 8.0, G4: 1.0, G5: 2.0, ABSENT: 3.0}  # G6 has none


def geneformer_layout(tokens: dict, medians: dict) -> tuple[dict, dict]:
    """Geneformer's value types: int specials, numpy int16/int64 token ids, float64 medians."""
    token_dict = {
        k: (v if k.startswith("<") else (np.int16(v) if v % 2 else np.int64(v)))
        for k, v in tokens.items()
    }
    return token_dict, {k: np.float64(v) for k, v in medians.items()}


@pytest.mark.parametrize("writer", ["numpy1", "numpy2"])
def test_geneformer_pickles_load_as_plain_numbers(tmp_path, writer):
    token_dict, median_dict = geneformer_layout(TOKENS, MEDIANS)
    dump = numpy1_pickle if writer == "numpy1" else (lambda o: pickle.dumps(o, protocol=4))
    tokens = vocabulary.read_geneformer_dictionary(
        write(tmp_path / "token_dictionary_gc30M.pkl", dump(token_dict)), int
    )
    medians = vocabulary.read_gene_median_dictionary(
        write(tmp_path / "gene_median_dictionary_gc30M.pkl", dump(median_dict))
    )
    assert tokens == TOKENS and list(tokens) == list(TOKENS)
    assert medians == MEDIANS
    assert {type(v) for v in tokens.values()} == {int}
    assert {type(v) for v in medians.values()} == {float}


def test_float32_and_big_endian_scalars_decode_exactly(tmp_path):
    values = {G1: np.float32(0.1), G2: np.dtype(">f8").type(1 / 3), G3: np.float16(2.5)}
    path = write(tmp_path / "m.pkl", pickle.dumps(values, protocol=4))
    got = vocabulary.read_gene_median_dictionary(path)
    assert got == {k: float(v) for k, v in values.items()}


class _Payload:
    """Pickles to a call of os.system: loading it with pickle.load would run a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "content",
    ["code", "array", "list", "string value", "nan"],
)
def test_unsafe_or_malformed_pickles_are_refused_in_one_line(tmp_path, content):
    marker = tmp_path / "ran"
    obj = {
        "code": {G1: _Payload(marker)},
        "array": {G1: np.array([1.0, 2.0])},
        "list": [G1, G2],
        "string value": {G1: "1.5"},
        "nan": {G1: float("nan")},
    }[content]
    path = write(tmp_path / "gene_median_dictionary_gc104M.pkl", pickle.dumps(obj, protocol=4))
    with pytest.raises(ConfigError) as caught:
        vocabulary.read_gene_median_dictionary(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    assert not marker.exists()  # nothing of the file was executed
    if content == "code":
        assert "system" in message and "refused" in message


def test_token_dictionary_pickle_imports_like_the_vocab_file(tmp_path, shared_data, human):
    """Geneformer's V1 token dictionary is its vocab.txt as a dict: both import the same."""
    text = shared_data / "geneformer_vocab.txt"
    lines = text.read_text().split()
    token_dict = {
        name: (i if name.startswith("<") else np.int16(i)) for i, name in enumerate(lines)
    }
    pkl = write(tmp_path / "token_dictionary_gc30M.pkl", numpy1_pickle(token_dict))
    from_pickle = vocabulary.import_token_mapping("hsapiens", pkl, human)
    assert from_pickle.table.equals(vocabulary.import_token_mapping("hsapiens", text, human).table)
    assert from_pickle.gene_table.height == 25_424


def test_v2_token_dictionary_keeps_token_order_and_drops_its_special_tokens(tmp_path, human):
    v2 = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, G3: 6, G1: 4, G2: 5}
    path = write(tmp_path / "token_dictionary_gc104M.pkl", pickle.dumps(v2, protocol=4))
    mapping = vocabulary.import_token_mapping("hsapiens", path, human)
    assert mapping.gene_table["gene_id"].to_list() == [G1, G2, G3]  # by Geneformer's token id
    assert mapping.token_of(G1) == 3
    assert mapping.gene_table["gene_name"].to_list() == ["TP53", "ACTB", "GAPDH"]


def test_imported_medians_replace_corpus_ones_and_unranked_genes_are_counted():
    summary = pl.DataFrame(
        {
            "gene_id": [G1, G2, G6],
            "n_obs": [3, 3, 3],
            "n_cells": [2, 3, 3],
            "mean": [1.0, 2.0, 3.0],
            "var": [0.1, 0.2, 0.3],
            "nonzero_median": [11.0, 12.0, 13.0],
        }
    )
    result = with_imported_medians(summary, MEDIANS)
    assert result.summary.columns == summary.columns
    assert result.summary["nonzero_median"].to_list() == [0.5, 20.0, None]
    assert result.summary.drop("nonzero_median").equals(summary.drop("nonzero_median"))
    assert (result.n_imported, result.n_without, result.n_unused) == (2, 1, 4)


# Counts of three cells over G1..G6 and what Geneformer's tokenizer makes of them:
# value = count / n_counts x 10,000 / median, sorted descending; genes without a median (G6)
# are dropped. Within a cell n_counts and 10,000 are common factors, so the order is that of
# count / median (medians G1 0.5, G2 20, G3 8, G4 1, G5 2):
COUNTS = np.array(
    [
        [3, 50, 12, 0, 7, 9],  # G1 3/0.5=6, G2 50/20=2.5, G3 12/8=1.5, G5 7/2=3.5; G6 dropped
        [0, 10, 40, 4, 3, 2],  # G2 0.5, G3 5, G4 4, G5 1.5
        [1, 200, 0, 3, 0, 30],  # G1 2, G2 10, G4 3
    ],
    dtype=np.int32,
)
# By hand, from the comments above (descending):
EXPECTED = [[G1, G5, G2, G3], [G3, G4, G5, G2], [G2, G4, G1]]


def test_imported_medians_reproduce_geneformers_token_order_by_hand(tmp_path, human):
    genes = [G1, G2, G3, G4, G5, G6]
    adata = ad.AnnData(
        sp.csr_matrix(COUNTS),
        obs=pd.DataFrame(index=["A", "B", "C"]),
        var=pd.DataFrame(index=genes),
    )
    n_counts = COUNTS.sum(axis=1).astype(np.float64)
    adata.obs["total_counts"] = n_counts
    write_shard(
        adata,
        tmp_path / "shards" / "cells",
        n_bins=11,
        meta={"dataset": "ds", "species": "hsapiens", "file": "cells.h5ad"},
    )

    token_dict, median_dict = geneformer_layout(TOKENS, MEDIANS)
    tokens_pkl = write(tmp_path / "token_dictionary_gc30M.pkl", numpy1_pickle(token_dict))
    medians_pkl = write(tmp_path / "gene_median_dictionary_gc30M.pkl", numpy1_pickle(median_dict))
    mapping = vocabulary.import_token_mapping("hsapiens", tokens_pkl, human)

    # The gene-stats command with --medians, as the workflow runs it.
    stats = compute_gene_stats(adata.X, np.array(genes), n_counts)
    stats.write_parquet(tmp_path / "ds.parquet")
    assert (
        main(
            [
                "gene-stats",
                "--species",
                "hsapiens",
                "--inputs",
                str(tmp_path / "ds.parquet"),
                "--exact-max-cells",
                "1000",
                "--out",
                str(tmp_path / "hsapiens.parquet"),
                "--summary",
                str(tmp_path / "hsapiens.summary.parquet"),
                "--medians",
                str(medians_pkl),
            ]
        )
        == 0
    )
    summary = pl.read_parquet(tmp_path / "hsapiens.summary.parquet")
    assert dict(zip(summary["gene_id"], summary["nonzero_median"], strict=True)) == {
        G1: 0.5,
        G2: 20.0,
        G3: 8.0,
        G4: 1.0,
        G5: 2.0,
        G6: None,
    }

    def ranked(medians: pl.DataFrame, max_len: int) -> list[list[str]]:
        collection = loader.ShardCollection(
            [tmp_path / "shards" / "cells"], {"hsapiens": mapping}, medians={"hsapiens": medians}
        )
        offsets, tokens = collection.rank_batch(collection.gather(np.arange(3)), max_len=max_len)
        gene_of = dict(zip(mapping.table["token"], mapping.table["gene_id"], strict=True))
        return [[gene_of[t] for t in tokens[a:b]] for a, b in pairwise(offsets)]

    assert ranked(summary, 2_048) == EXPECTED
    assert ranked(summary, 2) == [cell[:2] for cell in EXPECTED]  # top max_len only
    # The corpus' own medians order these cells differently: the import is what made them
    # Geneformer's.
    corpus = summarize(merge_gene_stats([stats]))
    assert ranked(corpus, 2_048) != EXPECTED


def test_gene_stats_command_refuses_an_unsafe_median_file(tmp_path, make_adata, capsys):
    adata = make_adata(n_cells=5, n_genes=20)
    stats = compute_gene_stats(
        adata.X, adata.var_names.to_numpy(), np.asarray(adata.X.sum(1)).ravel()
    )
    stats.write_parquet(tmp_path / "ds.parquet")
    bad = write(
        tmp_path / "gene_median_dictionary.pkl", pickle.dumps({G1: _Payload(tmp_path / "x")})
    )
    code = main(
        [
            "gene-stats",
            "--species",
            "hsapiens",
            "--inputs",
            str(tmp_path / "ds.parquet"),
            "--exact-max-cells",
            "1000",
            "--out",
            str(tmp_path / "out.parquet"),
            "--summary",
            str(tmp_path / "summary.parquet"),
            "--medians",
            str(bad),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        err.startswith("cellfoundry gene-stats: error: Geneformer dictionary") and str(bad) in err
    )
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "summary.parquet").exists()
    assert not (tmp_path / "x").exists()
