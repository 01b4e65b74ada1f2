"""The layouts people bring (issue 13, kinds 3 and 6-9): Cell Ranger 2 and 3+ HDF5 (one or two
genomes), 10x MTX folders, Cell Ranger `outs/` folders, `.h5ad.gz`, h5ad without X or with a
CSC matrix, loom layers; each read in blocks and compared with the format's own library."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from cellfoundry import readers
from cellfoundry.errors import DatasetError
from cellfoundry.preprocess import PreprocessSettings
from cellfoundry.readers import open_source
from cellfoundry.sources import SourceFile, dataset_sources
from conftest import count_matrix, protein_coding
from prep import LOOSE, output_bytes, preprocess_dataset, preprocess_path
from writers import write_10x_v2, write_10x_v3, write_loom, write_mtx

N_CELLS = 30


@pytest.fixture
def genes(human, mouse) -> dict[str, pd.DataFrame]:
    return {"hsapiens": protein_coding(human, 60), "mmusculus": protein_coding(mouse, 40)}


@pytest.fixture
def counts() -> dict[str, sp.csr_matrix]:
    return {
        "hsapiens": count_matrix(N_CELLS, 60, seed=1),
        "mmusculus": count_matrix(N_CELLS, 40, seed=2),
    }


BARCODES = [f"AAACCTG{i:04d}-1" for i in range(N_CELLS)]


def read_blocks(source: SourceFile, location: str = "X", block_cells: int = 7):
    """The whole matrix of a source as our reader gives it, block by block, and its var."""
    with open_source("ds", source) as reader:
        blocks = list(reader.blocks(location, block_cells))
        assert [start for start, _ in blocks] == list(range(0, reader.n_obs, block_cells))
        return sp.vstack([b for _, b in blocks]).tocsr(), reader.var(location), reader.obs


def assert_same_matrix(ours: sp.csr_matrix, theirs) -> None:
    assert ours.shape == theirs.shape
    assert np.array_equal(ours.toarray(), np.asarray(sp.csr_matrix(theirs).todense()))


# --- 10x Genomics HDF5 ----------------------------------------------------------------------


def test_cell_ranger_2_h5_equals_scanpy(genes, counts, human, tmp_path):
    hs = genes["hsapiens"]
    path = write_10x_v2(
        tmp_path / "filtered_gene_bc_matrices_h5.h5",
        {"GRCh38": (counts["hsapiens"], hs["gene_id"], hs["gene_name"])},
        BARCODES,
    )
    ours, var, obs = read_blocks(SourceFile("f", path, "10x"))
    theirs = sc.read_10x_h5(path, genome="GRCh38")
    assert_same_matrix(ours, theirs.X)
    assert list(var.index) == list(theirs.var["gene_ids"])
    assert list(var["gene_name"]) == list(theirs.var_names)
    assert list(obs.index) == list(theirs.obs_names)
    qc, _ = preprocess_path(path, human, tmp_path / "out")
    assert qc["genes_mapped"] == 60 and qc["counts_left_out"] == {}


@pytest.mark.parametrize("layout", ["cellranger2", "cellranger3"])
@pytest.mark.parametrize("species", ["hsapiens", "mmusculus"])
def test_barnyard_keeps_the_dataset_genome(genes, counts, human, mouse, tmp_path, layout, species):
    # Cell Ranger prefixes IDs and names of multi-genome references with the genome (padded
    # with underscores to equal lengths).
    prefixes = {"hsapiens": "GRCh38_", "mmusculus": "mm10___"}
    names = {"hsapiens": "GRCh38", "mmusculus": "mm10"}
    ids = {s: [prefixes[s] + g for g in genes[s]["gene_id"]] for s in genes}
    symbols = {s: [prefixes[s] + g for g in genes[s]["gene_name"]] for s in genes}
    path = tmp_path / "barnyard.h5"
    if layout == "cellranger2":
        write_10x_v2(
            path, {names[s]: (counts[s], ids[s], symbols[s]) for s in sorted(genes)}, BARCODES
        )
    else:
        write_10x_v3(
            path,
            sp.hstack([counts["hsapiens"], counts["mmusculus"]]).tocsr(),
            BARCODES,
            ids["hsapiens"] + ids["mmusculus"],
            symbols["hsapiens"] + symbols["mmusculus"],
            genomes=["GRCh38"] * 60 + ["mm10"] * 40,
        )
    other = "mmusculus" if species == "hsapiens" else "hsapiens"
    theirs = sc.read_10x_h5(path, genome=names[species])
    ours, var, _ = read_blocks(SourceFile("barnyard", path, "10x"))
    assert_same_matrix(ours[:, (var["genome"] == names[species]).to_numpy()], theirs.X)
    reference = human if species == "hsapiens" else mouse
    qc, out = preprocess_path(
        path,
        reference,
        tmp_path / "out",
        PreprocessSettings(min_genes=5, min_counts=50),
        species=species,
    )
    assert qc["genes_counted"] == qc["genes_mapped"] == len(genes[species])
    assert qc["features_left_out"] == {f"genome {names[other]}": len(genes[other])}
    assert qc["counts_left_out"] == {f"genome {names[other]}": int(counts[other].sum())}
    written = ad.read_h5ad(out.h5ad)
    assert list(written.var_names) == list(genes[species]["gene_id"])
    kept = theirs.obs_names.get_indexer(written.obs_names)
    assert_same_matrix(written.X, theirs.X[kept])
    assert np.array_equal(written.obs["total_counts"], np.asarray(theirs.X[kept].sum(1)).ravel())


def test_10x_h5_genomes_with_different_barcodes_fail_in_one_line(genes, counts, human, tmp_path):
    path = write_10x_v2(
        tmp_path / "broken.h5",
        {
            "GRCh38": (
                counts["hsapiens"],
                genes["hsapiens"]["gene_id"],
                genes["hsapiens"]["gene_name"],
            )
        },
        BARCODES,
    )
    with h5py.File(path, "a") as handle:
        group = handle.create_group("mm10")
        for name in ("data", "indices", "indptr", "shape", "genes", "gene_names"):
            handle.copy(handle[f"GRCh38/{name}"], group, name)
        group["barcodes"] = np.array([b.encode() for b in BARCODES[::-1]])
    with pytest.raises(DatasetError, match=r"broken.h5': .*list different barcodes"):
        preprocess_path(path, human, tmp_path / "out")


# --- 10x MTX folders ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "gzipped"), [(2, False), (2, True), (3, True), (3, False)]
)  # as Cell Ranger writes them first, then as people recompress them
@pytest.mark.parametrize("streamed", [False, True])
def test_mtx_folder_equals_scanpy(
    genes, counts, human, tmp_path, monkeypatch, version, gzipped, streamed
):
    hs = genes["hsapiens"]
    X = counts["hsapiens"]
    args = (X, BARCODES, hs["gene_id"], hs["gene_name"])
    folder = write_mtx(tmp_path / "sample1", *args, version=version, gzipped=gzipped)
    name = "features.tsv" if version == 3 else "genes.tsv"
    assert (folder / (name + (".gz" if gzipped else ""))).is_file()
    # scanpy reads each version in Cell Ranger's own layout only
    canonical = write_mtx(tmp_path / "canonical", *args, version=version)
    if streamed:  # past the size read whole: coordinate lines in order, in chunks of 50 lines
        monkeypatch.setattr(readers, "MTX_IN_MEMORY_NNZ", 10)
        monkeypatch.setattr(readers, "MTX_CHUNK_LINES", 50)
    (source,) = dataset_sources("ds", folder).files
    assert (source.name, source.format) == ("sample1", "mtx")
    ours, var, obs = read_blocks(source)
    theirs = sc.read_10x_mtx(canonical, var_names="gene_ids")
    assert_same_matrix(ours, theirs.X)
    assert list(var.index) == list(theirs.var_names)
    assert list(obs.index) == list(theirs.obs_names)
    for block in (1, 13):  # block sizes that do not divide the chunks
        again, _, _ = read_blocks(source, block_cells=block)
        assert_same_matrix(again, theirs.X)
    qc, out = preprocess_path(folder, human, tmp_path / "out", block_cells=4)
    assert qc["format"] == "mtx" and qc["genes_mapped"] == 60
    written = ad.read_h5ad(out.h5ad)
    assert_same_matrix(written.X, theirs.X[theirs.obs_names.get_indexer(written.obs_names)])


def test_large_unordered_mtx_is_refused_in_one_line(genes, counts, human, tmp_path, monkeypatch):
    hs = genes["hsapiens"]
    folder = write_mtx(
        tmp_path / "geo",
        counts["hsapiens"],
        BARCODES,
        hs["gene_id"],
        hs["gene_name"],
        shuffle=np.random.default_rng(0),
    )
    qc, _ = preprocess_path(folder, human, tmp_path / "small")  # small: scanpy reads it whole
    assert qc["cells_in"] == N_CELLS
    monkeypatch.setattr(readers, "MTX_IN_MEMORY_NNZ", 10)
    with pytest.raises(DatasetError) as error:
        preprocess_path(folder, human, tmp_path / "out")
    text = str(error.value)
    assert text.startswith(f"dataset 'ds', file '{folder}': matrix.mtx holds ")
    assert "not ordered by cell" in text and "convert the folder to h5ad" in text
    assert "\n" not in text and "truncated" not in text
    assert not list((tmp_path / "out").rglob("*.*"))


@pytest.mark.parametrize("streamed", [False, True])
def test_truncated_gzipped_mtx_fails_in_one_line(genes, human, tmp_path, monkeypatch, streamed):
    hs = genes["hsapiens"]
    barcodes = [f"C{i}-1" for i in range(300)]
    folder = write_mtx(
        tmp_path / "cut", count_matrix(300, 60), barcodes, hs["gene_id"], hs["gene_name"]
    )
    data = (folder / "matrix.mtx.gz").read_bytes()
    (folder / "matrix.mtx.gz").write_bytes(data[: len(data) * 2 // 3])
    if streamed:
        monkeypatch.setattr(readers, "MTX_IN_MEMORY_NNZ", 10)
    with pytest.raises(DatasetError, match=rf"'{folder}': cannot be read \(truncated or not"):
        preprocess_path(folder, human, tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*.*"))


def test_transposed_mtx_from_geo_is_read(genes, counts, human, tmp_path):
    hs = genes["hsapiens"]
    folder = write_mtx(
        tmp_path / "t", counts["hsapiens"], BARCODES, hs["gene_id"], hs["gene_name"], version=2
    )
    # cells x genes, as some GEO submitters write it
    lines = (folder / "matrix.mtx").read_text().splitlines()
    entries = [line.split() for line in lines[3:]]
    body = [f"{c} {g} {v}" for g, c, v in entries]
    (folder / "matrix.mtx").write_text(
        "\n".join([lines[0], f"{N_CELLS} 60 {len(entries)}", *body]) + "\n"
    )
    ours, _, _ = read_blocks(SourceFile("t", folder, "mtx"))
    assert_same_matrix(ours, counts["hsapiens"])


# --- Cell Ranger outs/ folders ----------------------------------------------------------------


def cell_ranger_run(root: Path, genes: pd.DataFrame, X: sp.csr_matrix) -> Path:
    """A Cell Ranger 3+ run: outs/ with filtered and raw matrices (HDF5 and MTX), molecule_info
    (junk bytes: it must never be opened) and the web summary."""
    outs = root / "outs"
    outs.mkdir(parents=True)
    # Empty droplets: one count each.
    empty = sp.csr_matrix(
        (np.ones(200), (np.arange(200), np.arange(200) % X.shape[1])), shape=(200, X.shape[1])
    )
    raw = sp.vstack([X, empty]).tocsr()
    raw_barcodes = BARCODES + [f"TTTGGTT{i:04d}-1" for i in range(200)]
    ids, names = genes["gene_id"], genes["gene_name"]
    write_10x_v3(outs / "filtered_feature_bc_matrix.h5", X, BARCODES, ids, names)
    write_10x_v3(outs / "raw_feature_bc_matrix.h5", raw, raw_barcodes, ids, names)
    write_mtx(outs / "filtered_feature_bc_matrix", X, BARCODES, ids, names)
    write_mtx(outs / "raw_feature_bc_matrix", raw, raw_barcodes, ids, names)
    (outs / "molecule_info.h5").write_bytes(b"\x00junk" * 1000)
    (outs / "web_summary.html").write_text("<html></html>")
    (root / "_log").write_text("")
    return outs


def test_cell_ranger_outs_reads_only_the_filtered_matrix(genes, counts, human, tmp_path):
    outs = cell_ranger_run(tmp_path / "pbmc_run", genes["hsapiens"], counts["hsapiens"])
    ignored = {
        "molecule_info.h5",
        "raw_feature_bc_matrix.h5",
        "raw_feature_bc_matrix",
        "filtered_feature_bc_matrix",
        "web_summary.html",
    }
    for path in (outs, outs.parent):  # the outs/ folder or the run's folder
        sources = dataset_sources("pbmc", path)
        assert [(s.path, s.format) for s in sources.files] == [
            (outs / "filtered_feature_bc_matrix.h5", "10x")
        ]
        names = {p.name for p in sources.ignored}
        assert names == (ignored if path == outs else ignored | {"_log"})
    # A folder of runs: one input per run, named after it.
    cell_ranger_run(tmp_path / "runs" / "donor2", genes["hsapiens"], counts["hsapiens"])
    shutil.move(tmp_path / "pbmc_run", tmp_path / "runs" / "donor1")
    sources = dataset_sources("pbmc", tmp_path / "runs")
    assert [(s.name, s.path.parent.parent.name) for s in sources.files] == [
        ("donor1", "donor1"),
        ("donor2", "donor2"),
    ]
    qc, _, out = preprocess_dataset(tmp_path / "runs" / "donor1", human, tmp_path / "out")
    assert qc["cells_in"] == N_CELLS  # each cell once
    assert {Path(p).name for p in qc["ignored"]} == ignored | {"_log"}
    provenance = json.loads(out.provenance.read_text())
    assert [Path(i["file"]).name for i in provenance["inputs"]] == ["filtered_feature_bc_matrix.h5"]


def test_cell_ranger_outs_without_h5_reads_the_filtered_mtx(genes, counts, tmp_path):
    outs = cell_ranger_run(tmp_path / "run", genes["hsapiens"], counts["hsapiens"])
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    (source,) = dataset_sources("ds", outs).files
    assert (source.path, source.format) == (outs / "filtered_feature_bc_matrix", "mtx")
    ours, _, _ = read_blocks(source)
    assert_same_matrix(ours, counts["hsapiens"])


# --- h5ad variants ------------------------------------------------------------------------------


def test_gzipped_h5ad_equals_the_h5ad(make_adata, human, tmp_path):
    make_adata().write_h5ad(tmp_path / "sample.h5ad")
    (tmp_path / "gz").mkdir()
    with (
        open(tmp_path / "sample.h5ad", "rb") as source,
        gzip.open(tmp_path / "gz" / "sample.h5ad.gz", "wb") as out,
    ):
        shutil.copyfileobj(source, out)
    (source,) = dataset_sources("ds", tmp_path / "gz").files
    assert (source.name, source.format) == ("sample", "h5ad")
    plain, a = preprocess_path(tmp_path / "sample.h5ad", human, tmp_path / "a", block_cells=7)
    zipped, b = preprocess_path(
        tmp_path / "gz" / "sample.h5ad.gz", human, tmp_path / "b", block_cells=7
    )
    assert zipped["h5ad_blake3"] == plain["h5ad_blake3"]
    bytes_a, bytes_b = output_bytes(a), output_bytes(b)
    assert {k: v for k, v in bytes_a.items() if k != "qc"} == {
        k: v for k, v in bytes_b.items() if k != "qc"
    }


def test_h5ad_without_x_names_its_layers(make_adata, human, tmp_path):
    adata = make_adata()
    layers = {"spliced": adata.X.copy(), "unspliced": adata.X.copy()}
    bare = ad.AnnData(obs=adata.obs, var=adata.var, layers=layers)
    path = tmp_path / "velocity.h5ad"
    bare.write_h5ad(path)
    with pytest.raises(DatasetError) as error:
        preprocess_path(path, human, tmp_path / "out")
    text = str(error.value)
    assert "\n" not in text
    assert text == (
        f"dataset 'ds', file '{path}': X is absent and there is no layers/counts or raw.X; the "
        "file has layers/spliced, layers/unspliced; set preprocess.counts to one of "
        "layers/spliced, layers/unspliced"
    )
    settings = PreprocessSettings(**{**LOOSE.__dict__, "counts": "layers/spliced"})
    qc, out = preprocess_path(path, human, tmp_path / "out", settings)
    assert qc["counts_source"] == "layers/spliced" and qc["cells_kept"] == adata.n_obs
    assert_same_matrix(ad.read_h5ad(out.h5ad).X, adata.X)


def test_csc_h5ad_is_read_when_small_and_refused_with_a_how_to_when_large(
    make_adata, human, tmp_path, monkeypatch
):
    adata = make_adata()
    csr_path, csc_path = tmp_path / "csr.h5ad", tmp_path / "csc.h5ad"
    adata.write_h5ad(csr_path)
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(csc_path)
    a, _ = preprocess_path(csr_path, human, tmp_path / "a", block_cells=7)
    b, _ = preprocess_path(csc_path, human, tmp_path / "b", block_cells=7)
    assert a["h5ad_blake3"] == b["h5ad_blake3"]
    monkeypatch.setattr(readers, "CSC_IN_MEMORY_NNZ", 100)
    with pytest.raises(DatasetError) as error:
        preprocess_path(csc_path, human, tmp_path / "c")
    assert str(error.value) == (
        f"dataset 'ds', file '{csc_path}': X is a CSC matrix (genes stored contiguously) with "
        f"{adata.X.nnz:,} non-zeros, too large to read whole; convert it once to CSR, e.g. "
        "`adata = anndata.read_h5ad(path); adata.X = adata.X.tocsr(); adata.write_h5ad(out)`"
    )
    assert not list((tmp_path / "c").rglob("*.*"))


# --- loom layers --------------------------------------------------------------------------------


def test_velocyto_loom_needs_its_layer_named(genes, counts, mouse, tmp_path):
    mm = genes["mmusculus"]
    spliced = counts["mmusculus"].toarray()
    unspliced = (spliced // 3).astype(np.uint32)
    path = write_loom(
        tmp_path / "velocyto.loom",
        np.log1p(spliced).astype(np.float32),  # velocyto's main matrix is not always counts
        row_attrs={"Gene": mm["gene_name"], "Accession": mm["gene_id"]},
        col_attrs={"CellID": [f"sample1:{b}" for b in BARCODES]},
        layers={
            "spliced": spliced.astype(np.uint32),
            "unspliced": unspliced,
            "ambiguous": unspliced // 2,
        },
    )
    with pytest.raises(DatasetError) as error:
        preprocess_path(path, mouse, tmp_path / "auto", species="mmusculus")
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(
        f"dataset 'ds', file '{path}': no raw counts: X holds non-integer values"
    )
    assert text.endswith(
        "set preprocess.counts to one of layers/ambiguous, layers/spliced, layers/unspliced"
    )
    settings = PreprocessSettings(**{**LOOSE.__dict__, "counts": "layers/spliced"})
    qc, out = preprocess_path(
        path, mouse, tmp_path / "spliced", settings, species="mmusculus", block_cells=7
    )
    assert qc["counts_source"] == "layers/spliced"
    assert qc["mapping_column"] == "var/Accession" and qc["mapping_rate"] == 1.0
    written = ad.read_h5ad(out.h5ad)
    assert list(written.var_names) == list(mm["gene_id"])
    kept = [f"sample1:{b}" for b in BARCODES]
    assert_same_matrix(written.X, spliced[[kept.index(c) for c in written.obs_names]])


def test_scanpy_written_loom_with_normalized_x_takes_its_counts_layer(
    genes, counts, human, tmp_path
):
    hs = genes["hsapiens"]
    X = counts["hsapiens"].toarray()
    normalized = np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32)
    path = write_loom(
        tmp_path / "scanpy.loom",
        normalized,
        row_attrs={"var_names": hs["gene_name"], "gene_ids": hs["gene_id"]},
        col_attrs={"obs_names": BARCODES, "louvain": np.array(["0", "1"] * (N_CELLS // 2))},
        layers={"counts": X.astype(np.float32)},
    )
    qc, out = preprocess_path(path, human, tmp_path / "out", block_cells=7)
    assert qc["counts_source"] == "layers/counts" and qc["mapping_column"] == "var/gene_ids"
    written = ad.read_h5ad(out.h5ad)
    assert_same_matrix(written.X, X[[BARCODES.index(c) for c in written.obs_names]])
    assert set(written.obs["louvain"]) == {"0", "1"}
