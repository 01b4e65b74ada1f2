"""Stage 6: shards (written while a file is preprocessed), the shard manifest with the default
split's held-out cells, and the loader that serves tokenized random batches from many shards."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from cellfoundry import loader, vocabulary
from cellfoundry.discretize import quantile_bins_reference, rank_order_reference, tie_uniforms
from cellfoundry.errors import DatasetError
from cellfoundry.gene_stats import merge_gene_stats, summarize
from cellfoundry.seeds import derive_seed
from cellfoundry.shards import (
    ShardWriter,
    shard_folders,
    shard_manifest,
    write_dataset_manifest,
    write_shard,
)
from cellfoundry.splits import HOLDOUT_SCHEMA, MANIFEST_SCHEMA
from conftest import REPO
from prep import preprocess_path
from workers import gather_in_worker

N_BINS = 11


def digest(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def corpus(make_adata, human, tmp_path):
    """Two datasets (three files) preprocessed into shards, a token mapping and medians."""
    roots, adatas, stats = {}, {}, []
    for dataset, names, seed in (("a", ["a1", "a2"], 10), ("b", ["b1"], 20)):
        folder = tmp_path / "in" / dataset
        folder.mkdir(parents=True)
        shards = []
        for i, name in enumerate(names):
            adata = make_adata(n_cells=40 + 10 * i, seed=seed + i)
            adata.write_h5ad(folder / f"{name}.h5ad")
            _, out = preprocess_path(
                folder / f"{name}.h5ad", human, tmp_path / dataset, dataset=dataset, n_bins=N_BINS
            )
            adatas[name] = ad.read_h5ad(out.h5ad)
            shards.append(out.shard)
            stats.append(out.gene_stats)
        roots[dataset] = tmp_path / dataset / "shards" / dataset
        write_dataset_manifest(dataset, "hsapiens", shards, roots[dataset] / "manifest.json")
    genes = sorted(set().union(*(a.var_names for a in adatas.values())))
    # Leave one gene out of the vocabulary: the loader must drop it.
    mapping = vocabulary.from_genes("hsapiens", genes[1:], human)
    return {
        "roots": roots,
        "shards": {name: roots[name[0]] / name for name in adatas},
        "adatas": adatas,
        "mapping": mapping,
        "medians": summarize(merge_gene_stats(sorted(stats))),
        "dropped": genes[0],
        "tmp": tmp_path,
    }


def test_shards_hold_counts_bins_and_annotation(corpus):
    folder = corpus["shards"]["a1"]
    adata = corpus["adatas"]["a1"]
    X = sp.csr_matrix(adata.X)
    entries = np.load(folder / "entries.npy")
    assert entries.dtype.itemsize == 9  # packed records
    assert np.array_equal(np.load(folder / "indptr.npy"), X.indptr)
    assert np.array_equal(entries["gene"], X.indices)
    assert np.array_equal(entries["count"], X.data)
    # scGPT's bins with its random tie-break, seeded by the file and each cell's index in the
    # file (every cell is kept here, so its row).
    assert adata.n_obs == 40
    uniforms = tie_uniforms(X.indptr, derive_seed(0, "bins", "a", "a1"))
    assert np.array_equal(entries["bin"], quantile_bins_reference(X, N_BINS, uniforms))
    assert entries["bin"].min() >= 1 and entries["bin"].max() <= N_BINS - 1
    assert np.array_equal(np.load(folder / "total_counts.npy"), adata.obs["total_counts"])
    obs = pl.read_parquet(folder / "obs.parquet")
    assert obs["obs_name"].to_list() == list(adata.obs_names)
    assert obs["cell_type"].to_list() == adata.obs["cell_type"].astype(str).to_list()
    var = pl.read_parquet(folder / "var.parquet")
    assert var["gene_id"].to_list() == list(adata.var_names)
    meta = json.loads((folder / "shard.json").read_text())
    assert (meta["n_cells"], meta["dataset"], meta["file"], meta["n_bins"]) == (
        adata.n_obs,
        "a",
        "a1.h5ad",
        N_BINS,
    )
    assert shard_folders(corpus["roots"]["a"]) == [corpus["shards"]["a1"], corpus["shards"]["a2"]]


def test_write_shard_of_an_anndata_equals_the_streamed_shard(corpus, tmp_path):
    adata = corpus["adatas"]["a2"]
    meta = json.loads((corpus["shards"]["a2"] / "shard.json").read_text())
    again = tmp_path / "again"
    write_shard(
        adata,
        again,
        n_bins=N_BINS,
        meta={k: meta[k] for k in ("dataset", "species", "file")},
        seed=derive_seed(0, "bins", "a", "a2"),  # every cell kept: positions are file indices
        block_cells=7,
    )
    assert digest(again) == digest(corpus["shards"]["a2"])


def test_shard_writer_bytes_do_not_depend_on_blocks(tmp_path):
    rng = np.random.default_rng(0)
    X = sp.random(53, 40, density=0.3, random_state=rng, format="csr", dtype=np.float64)
    X.data = np.ceil(X.data * 9)
    total = np.asarray(X.sum(1)).ravel()
    var = pl.DataFrame({"gene_id": [f"ENSG{i:011d}" for i in range(40)]}).to_pandas()
    var = var.set_index("gene_id").assign(gene_name="g")
    obs = pl.DataFrame({"c": [str(i) for i in range(53)]}).to_pandas().set_index("c")
    digests = []
    for block in (1, 7, 100):
        writer = ShardWriter(tmp_path / str(block), n_bins=N_BINS)
        for start in range(0, 53, block):
            B = X[start : start + block]
            bins = quantile_bins_reference(B, N_BINS)
            writer.append(B.indptr, B.indices, B.data, bins, total[start : start + block])
        writer.close(var, obs, {"dataset": "d", "species": "hsapiens", "file": "f.h5ad"})
        digests.append(digest(tmp_path / str(block)))
        assert np.load(tmp_path / str(block) / "indptr.npy")[-1] == X.nnz
    assert digests[0] == digests[1] == digests[2]


def test_gather_maps_tokens_and_drops_genes_outside_vocabulary(corpus):
    names = ["a1", "a2", "b1"]
    collection = loader.ShardCollection(
        [corpus["shards"][n] for n in names], {"hsapiens": corpus["mapping"]}
    )
    sizes = [corpus["adatas"][n].n_obs for n in names]
    assert len(collection) == sum(sizes)
    cells = np.array([len(collection) - 1, 3, sizes[0] + 5, sizes[0], sizes[0] - 1])
    batch = collection.gather(cells)
    assert batch.cells.tolist() == sorted(cells.tolist())
    mapping = corpus["mapping"]
    for row, cell in enumerate(batch.cells):
        s = int(np.searchsorted(collection.cell_offsets, cell, side="right") - 1)
        adata = corpus["adatas"][names[s]]
        x = adata.X[cell - collection.cell_offsets[s]].toarray().ravel()
        genes = adata.var_names.to_numpy()
        keep = (x > 0) & (genes != corpus["dropped"])
        start, stop = batch.offsets[row], batch.offsets[row + 1]
        assert batch.tokens[start:stop].tolist() == mapping.tokens(genes[keep]).tolist()
        assert batch.counts[start:stop].tolist() == x[keep].tolist()
    with pytest.raises(IndexError):
        collection.gather(np.array([len(collection)]))
    assert collection.genes_outside_vocabulary() == {"a": (1, 300), "b": (1, 300)}


def test_rank_batch_applies_corpus_medians(corpus):
    names = ["a1", "b1"]
    collection = loader.ShardCollection(
        [corpus["shards"][n] for n in names],
        {"hsapiens": corpus["mapping"]},
        medians={"hsapiens": corpus["medians"]},
    )
    batch = collection.gather(np.arange(len(collection)))
    offsets, tokens = collection.rank_batch(batch, max_len=25)
    # Reference: Geneformer's recipe on the rows, count / total * 10,000 / median, genes
    # outside the vocabulary excluded.
    mapping = corpus["mapping"]
    medians = dict(
        zip(
            corpus["medians"]["gene_id"].to_list(),
            corpus["medians"]["nonzero_median"].to_list(),
            strict=True,
        )
    )
    for s, name in enumerate(names):
        adata = corpus["adatas"][name]
        median = np.array([medians[g] if g != corpus["dropped"] else 0.0 for g in adata.var_names])
        X = sp.csr_matrix(adata.X)
        ref_indptr, ref_genes = rank_order_reference(
            X.indptr, X.indices, X.data, adata.obs["total_counts"].to_numpy(), median, 25
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


def splits_frame(rows: list[tuple[str, str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        [(split, dataset, "hsapiens", file, "x") for split, dataset, file in rows],
        schema=MANIFEST_SCHEMA,
        orient="row",
    )


def test_shard_manifest_joins_splits_and_holds_out_cells(corpus):
    manifests = [corpus["roots"][d] / "manifest.json" for d in ("a", "b")]
    splits = splits_frame(
        [("train", "a", "a1.h5ad"), ("train", "a", "a2.h5ad"), ("val", "b", "b1.h5ad")]
    )
    held = [0, 7, 11, 39]
    holdout = pl.DataFrame(
        {"dataset": ["a"] * 4, "file": ["a1.h5ad"] * 4, "cell": held}, schema=HOLDOUT_SCHEMA
    )
    manifest = shard_manifest(splits, manifests, holdout=holdout)
    rows = manifest.select("split", "dataset", "file", "cells", "n_cells").rows()
    assert rows == [
        ("train", "a", "a1.h5ad", "rest", 36),
        ("train", "a", "a2.h5ad", "all", 50),
        ("val", "a", "a1.h5ad", "holdout", 4),
        ("val", "b", "b1.h5ad", "all", 40),
    ]
    assert manifest.filter(pl.col("cells") != "all")["holdout"].to_list() == [held, held]
    manifest.write_parquet(corpus["tmp"] / "shards.parquet")
    assert loader.open_manifest(corpus["tmp"] / "shards.parquet", "val").height == 2
    # Training and validation together hold every cell once.
    adatas = corpus["adatas"]
    mapping = {"hsapiens": corpus["mapping"]}
    seen = []
    for split in ("train", "val"):
        rows = loader.open_manifest(corpus["tmp"] / "shards.parquet", split)
        collection = loader.ShardCollection(rows, mapping)
        assert len(collection) == rows["n_cells"].sum()
        batch = collection.gather(np.arange(len(collection)))
        expected = []
        for record in rows.iter_rows(named=True):
            adata = adatas[record["file"].removesuffix(".h5ad")]
            cells = np.arange(adata.n_obs)
            if record["cells"] == "holdout":
                cells = np.array(record["holdout"])
            elif record["cells"] == "rest":
                cells = np.setdiff1d(cells, record["holdout"])
            expected += [(record["file"], c) for c in cells]
            seen += [(record["file"], c) for c in cells]
        assert len(expected) == len(batch)
        # Every gathered cell is the expected h5ad row (genes outside the vocabulary dropped).
        totals = collection.total_counts(batch.cells)
        for row, (file, cell) in enumerate(expected):
            adata = adatas[file.removesuffix(".h5ad")]
            x = adata.X[cell].toarray().ravel()
            keep = (x > 0) & (adata.var_names.to_numpy() != corpus["dropped"])
            counts = batch.counts[batch.offsets[row] : batch.offsets[row + 1]]
            assert counts.tolist() == x[keep].tolist()
            assert totals[row] == adata.obs["total_counts"].iloc[cell]
    assert len(seen) == len(set(seen)) == sum(a.n_obs for a in adatas.values())
    missing = splits.with_columns(pl.lit("zzz.h5ad").alias("file"))
    with pytest.raises(DatasetError, match="listed in a split but has no shard"):
        shard_manifest(missing, manifests)


def test_pickled_collection_serves_the_same_batches(corpus):
    collection = loader.ShardCollection(
        [corpus["shards"][n] for n in ("a1", "b1")],
        {"hsapiens": corpus["mapping"]},
        medians={"hsapiens": corpus["medians"]},
    )
    cells = np.array([1, 44, 60])
    before = collection.gather(cells)  # maps the shards first: the maps must not travel
    clone = pickle.loads(pickle.dumps(collection))
    assert clone._mapped == set()
    after = clone.gather(cells)
    for field in ("cells", "offsets", "tokens", "counts", "bins", "shard"):
        assert np.array_equal(getattr(before, field), getattr(after, field))
    assert np.array_equal(
        clone.rank_batch(after, max_len=10)[1], collection.rank_batch(before, max_len=10)[1]
    )


def test_collection_serves_spawned_workers(corpus):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    collection = loader.ShardCollection(
        [corpus["shards"][n] for n in ("a1", "a2", "b1")], {"hsapiens": corpus["mapping"]}
    )
    cells = np.array([0, 41, 95, 129])
    here = gather_in_worker(collection, cells)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        there = pool.submit(gather_in_worker, collection, cells).result(timeout=300)
    for a, b in zip(here, there, strict=True):
        assert np.array_equal(a, b)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_map_npy_holds_no_file_descriptor(corpus, tmp_path):
    shards = [corpus["shards"][n] for n in ("a1", "a2", "b1")] * 40
    before = open_fds()
    maps = [loader.map_npy(s / "entries.npy") for s in shards]
    assert open_fds() == before
    for mapped, folder in zip(maps, shards, strict=True):
        assert np.array_equal(mapped, np.load(folder / "entries.npy"))
        assert not mapped.flags.writeable
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros(0, dtype=np.int64))
    assert loader.map_npy(empty).shape == (0,)
    collection = loader.ShardCollection(shards, {"hsapiens": corpus["mapping"]})
    collection.gather(np.arange(len(collection)))
    assert len(collection._mapped) == len(shards)
    assert open_fds() == before


def test_loader_reads_more_shards_than_open_files_allow(tmp_path):
    script = textwrap.dedent(
        """
        import resource, sys
        from pathlib import Path
        import numpy as np, pandas as pd
        from cellfoundry import loader, vocabulary
        from cellfoundry.reference import load_bundled
        from cellfoundry.shards import ShardWriter

        root = Path(sys.argv[1])
        human = load_bundled("hsapiens")
        genes = human.table["gene_id"].head(20).to_list()
        var = pd.DataFrame({"gene_name": ["g"] * 20}, index=genes)
        shards = []
        for s in range(200):
            writer = ShardWriter(root / f"s{s}", n_bins=5)
            indptr = np.array([0, 2, 3])
            writer.append(indptr, np.array([s % 19, 19, 19]), np.array([s + 1, 7, 7]),
                          np.array([1, 2, 1], np.uint8), np.array([s + 8.0, 7.0]))
            writer.close(var, pd.DataFrame(index=["x", "y"]),
                         {"dataset": f"d{s % 3}", "species": "hsapiens", "file": f"s{s}.h5ad"})
            shards.append(root / f"s{s}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        mapping = vocabulary.from_genes("hsapiens", genes, human)
        collection = loader.ShardCollection(shards, {"hsapiens": mapping})
        batch = collection.gather(np.arange(len(collection)))
        first = batch.counts[batch.offsets[:-1][::2]]
        assert first.tolist() == [s + 1 for s in range(200)], first
        assert batch.counts[batch.offsets[1::2]].tolist() == [7] * 200
        print("served", len(batch), "cells of", collection.n_shards, "shards")
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served 400 cells of 200 shards" in result.stdout


def test_batches_held_by_the_caller_are_never_overwritten(corpus):
    """Output memory is reused across batches only once no array of a batch is alive."""
    collection = loader.ShardCollection(
        [corpus["shards"][n] for n in ("a1", "a2", "b1")],
        {"hsapiens": corpus["mapping"]},
        medians={"hsapiens": corpus["medians"]},
    )
    rng = np.random.default_rng(3)
    plans = [rng.choice(len(collection), 17, replace=False) for _ in range(12)]
    fields = ("offsets", "tokens", "counts", "bins", "total_counts")

    def copied(batch):
        return [getattr(batch, f).copy() for f in fields]

    # Every batch kept alive (more than the pool keeps), then compared with a fresh collection.
    held = [collection.gather(cells) for cells in plans]
    fresh = loader.ShardCollection(
        [corpus["shards"][n] for n in ("a1", "a2", "b1")],
        {"hsapiens": corpus["mapping"]},
        medians={"hsapiens": corpus["medians"]},
    )
    expected = [copied(fresh.gather(cells)) for cells in plans]
    for batch, want in zip(held, expected, strict=True):
        for got, ref in zip(copied(batch), want, strict=True):
            assert np.array_equal(got, ref)
    # Only one array of a batch kept (a view keeps its whole block), the rest dropped.
    tokens_only = [collection.gather(cells).tokens for cells in plans]
    for tokens, want in zip(tokens_only, expected, strict=True):
        assert np.array_equal(tokens, want[1])
    # Batches dropped at once: the same block serves the next batch, with the right values.
    del held, tokens_only
    first = collection.gather(plans[0])
    block = id(first.tokens.base)  # not a reference: it would keep the block in use
    assert block in [id(kept) for kept in collection._buffers.blocks]
    del first
    again = collection.gather(plans[1])
    assert id(again.tokens.base) == block
    for got, ref in zip(copied(again), expected[1], strict=True):
        assert np.array_equal(got, ref)


def mapped_regions(path: Path) -> int:
    return sum(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


def test_map_npy_reads_every_header_numpy_writes_and_unmaps_with_the_last_view(tmp_path):
    arrays = {
        "int64": np.arange(7, dtype=np.int64),
        "records": np.array([(1, 2, 3), (4, 5, 6)], dtype=loader.ENTRY),
        "matrix": np.arange(24.0).reshape(2, 3, 4),
        "scalar": np.array(5.0),
        "wide": np.ones(3, dtype=[(f"f{i}", "<i4") for i in range(400)]),  # 8 kB header
    }
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    with open(tmp_path / "version2.npy", "wb") as handle:
        np.lib.format.write_array(handle, arrays["matrix"], version=(2, 0))
    arrays["version2"] = arrays["matrix"]
    for name, array in arrays.items():
        mapped = loader.map_npy(tmp_path / f"{name}.npy")
        assert (mapped.dtype, mapped.shape) == (array.dtype, array.shape), name
        assert np.array_equal(mapped, array) and not mapped.flags.writeable, name
    del mapped
    path = tmp_path / "int64.npy"
    before = mapped_regions(path)
    view = loader.map_npy(path)[2:5]
    assert mapped_regions(path) == before + 1
    assert view.tolist() == [2, 3, 4]
    del view
    assert mapped_regions(path) == before


def test_output_buffers_keep_a_bounded_number_of_bytes():
    pool = loader.OutputBuffers(keep=3, max_bytes=1000, slack=1.0)
    a = pool.take(400)
    b = pool.take(400)
    c = pool.take(400)  # a third block would pass max_bytes: the caller's alone
    assert [x.nbytes for x in pool.blocks] == [400, 400]
    assert all(c is not kept for kept in pool.blocks)
    del a
    assert pool.take(300) is pool.blocks[0]  # free again, and large enough
    del b, c
    pool.take(700)  # larger than any free block; replacing one would pass max_bytes
    assert [x.nbytes for x in pool.blocks] == [400, 400]
    pool.take(500)  # replaces a free block: 400 + 500 <= 1000
    assert sorted(x.nbytes for x in pool.blocks) == [400, 500]
