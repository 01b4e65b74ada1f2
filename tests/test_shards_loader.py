"""Stage 6: shards and the loader that serves tokenized random batches from many of them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from cellfoundry import loader, vocabulary
from cellfoundry.discretize import quantile_bins_reference, rank_order_reference
from cellfoundry.errors import DatasetError
from cellfoundry.gene_stats import compute_gene_stats, merge_gene_stats, summarize
from cellfoundry.shards import shard_manifest, write_dataset_shards
from cellfoundry.splits import MANIFEST_SCHEMA


def preprocessed(make_adata, folder: Path, names: list[str], seed: int) -> None:
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        adata = make_adata(n_cells=40 + 10 * i, seed=seed + i)
        adata.X = adata.X.astype(np.int32)
        adata.obs["total_counts"] = (
            np.asarray(adata.X.sum(1)).ravel().astype(float) + 7
        )  # unmapped genes too
        adata.write_h5ad(folder / f"{name}.h5ad")


def digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def corpus(make_adata, human, tmp_path):
    """Two datasets (three files) with shards, a token mapping and medians."""
    preprocessed(make_adata, tmp_path / "a", ["a1", "a2"], seed=10)
    preprocessed(make_adata, tmp_path / "b", ["b1"], seed=20)
    roots = {}
    for name in ("a", "b"):
        write_dataset_shards(
            name, "hsapiens", tmp_path / name, tmp_path / "shards" / name, n_bins=11
        )
        roots[name] = tmp_path / "shards" / name
    adatas = {p.stem: ad.read_h5ad(p) for p in sorted(tmp_path.glob("[ab]/*.h5ad"))}
    genes = sorted(set().union(*(a.var_names for a in adatas.values())))
    # Leave one gene out of the vocabulary: the loader must drop it.
    mapping = vocabulary.from_genes("hsapiens", genes[1:], human)
    stats = merge_gene_stats(
        [
            compute_gene_stats(a.X, a.var_names.to_numpy(), a.obs["total_counts"].to_numpy())
            for a in adatas.values()
        ]
    )
    return {
        "roots": roots,
        "adatas": adatas,
        "mapping": mapping,
        "medians": summarize(stats),
        "dropped": genes[0],
        "tmp": tmp_path,
    }


def test_shards_hold_counts_bins_and_annotation(corpus):
    shard = loader.open_shard(corpus["roots"]["a"] / "a1")
    adata = corpus["adatas"]["a1"]
    X = sp.csr_matrix(adata.X)
    assert np.array_equal(shard.indptr, X.indptr)
    assert np.array_equal(shard.indices, X.indices)
    assert np.array_equal(shard.counts, X.data)
    assert np.array_equal(shard.bins, quantile_bins_reference(X, 11))
    assert shard.bins.min() >= 1 and shard.bins.max() <= 10
    assert np.array_equal(shard.total_counts, adata.obs["total_counts"].to_numpy())
    assert shard.obs()["cell_type"].to_list() == adata.obs["cell_type"].astype(str).to_list()
    assert shard.meta["n_cells"] == adata.n_obs and shard.dataset == "a"


def test_shards_are_reproducible(make_adata, tmp_path, corpus):
    again = tmp_path / "again"
    write_dataset_shards("a", "hsapiens", corpus["tmp"] / "a", again, n_bins=11)
    assert digest(again) == digest(corpus["roots"]["a"])


def test_gather_maps_tokens_and_drops_genes_outside_vocabulary(corpus):
    shards = [corpus["roots"]["a"] / "a1", corpus["roots"]["a"] / "a2", corpus["roots"]["b"] / "b1"]
    collection = loader.ShardCollection(shards, {"hsapiens": corpus["mapping"]})
    assert len(collection) == 40 + 50 + 40
    cells = np.array([129, 3, 45, 88, 40])
    batch = collection.gather(cells)
    assert batch.cells.tolist() == sorted(cells.tolist())
    mapping = corpus["mapping"]
    for row, cell in enumerate(batch.cells):
        s = int(np.searchsorted(collection.cell_offsets, cell, side="right") - 1)
        adata = corpus["adatas"][["a1", "a2", "b1"][s]]
        x = adata.X[cell - collection.cell_offsets[s]].toarray().ravel()
        genes = adata.var_names.to_numpy()
        keep = (x > 0) & (genes != corpus["dropped"])
        start, stop = batch.offsets[row], batch.offsets[row + 1]
        assert batch.tokens[start:stop].tolist() == mapping.tokens(genes[keep]).tolist()
        assert batch.counts[start:stop].tolist() == x[keep].tolist()
    with pytest.raises(IndexError):
        collection.gather(np.array([130]))


def test_rank_batch_applies_corpus_medians(corpus):
    shards = [corpus["roots"]["a"] / "a1", corpus["roots"]["b"] / "b1"]
    collection = loader.ShardCollection(
        shards, {"hsapiens": corpus["mapping"]}, medians={"hsapiens": corpus["medians"]}
    )
    batch = collection.gather(np.arange(len(collection)))
    offsets, tokens = collection.rank_batch(batch, max_len=25)
    # Reference: Geneformer's recipe on the dense rows, genes outside the vocabulary excluded.
    mapping = corpus["mapping"]
    medians = dict(
        zip(
            corpus["medians"]["gene_id"].to_list(),
            corpus["medians"]["nonzero_median"].to_list(),
            strict=True,
        )
    )
    for name, s in (("a1", 0), ("b1", 1)):
        adata = corpus["adatas"][name]
        scale = np.array(
            [1 / medians[g] if g != corpus["dropped"] else 0.0 for g in adata.var_names]
        )
        X = sp.csr_matrix(adata.X)
        ref_indptr, ref_genes = rank_order_reference(
            X.indptr, X.indices, X.data, adata.obs["total_counts"].to_numpy(), scale, 25
        )
        first = int(collection.cell_offsets[s])
        for cell in range(adata.n_obs):
            ours = tokens[offsets[first + cell] : offsets[first + cell + 1]]
            ref = mapping.tokens(
                adata.var_names.to_numpy()[ref_genes[ref_indptr[cell] : ref_indptr[cell + 1]]]
            )
            assert ours.tolist() == ref.tolist()
    assert np.diff(offsets).max() == 25


def test_random_batches_are_seeded_permutations():
    batches = list(loader.random_batches(103, 10, seed=5, epoch=1))
    assert len(batches) == 10
    flat = np.concatenate(batches)
    assert len(np.unique(flat)) == 100
    assert np.array_equal(
        flat, np.concatenate(list(loader.random_batches(103, 10, seed=5, epoch=1)))
    )
    assert not np.array_equal(
        flat, np.concatenate(list(loader.random_batches(103, 10, seed=5, epoch=2)))
    )


def test_shard_manifest_joins_splits(corpus):
    splits = pl.DataFrame(
        [("train", "a", "hsapiens", "a1.h5ad", "x"), ("val", "b", "hsapiens", "b1.h5ad", "y")],
        schema=MANIFEST_SCHEMA,
        orient="row",
    )
    manifest = shard_manifest(splits, corpus["roots"])
    assert manifest.select("split", "dataset", "n_cells").rows() == [
        ("train", "a", 40),
        ("val", "b", 40),
    ]
    manifest.write_parquet(corpus["tmp"] / "shards.parquet")
    assert loader.open_manifest(corpus["tmp"] / "shards.parquet", "val") == [
        corpus["roots"]["b"] / "b1"
    ]
    missing = splits.with_columns(pl.lit("zzz.h5ad").alias("file"))
    with pytest.raises(DatasetError, match="listed in a split but has no shard"):
        shard_manifest(missing, corpus["roots"])
