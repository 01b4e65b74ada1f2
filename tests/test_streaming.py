"""Streaming preprocessing: outputs do not depend on the block size, and a file read in blocks
gives what the format's own library gives when it reads the whole file."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import polars as pl
import pytest
import scanpy as sc
import scipy.sparse as sp

from cellfoundry import readers
from cellfoundry.demo import DEMO_DATASETS, write_demo_corpus
from cellfoundry.preprocess import PreprocessSettings
from cellfoundry.sources import dataset_sources
from conftest import count_matrix, protein_coding
from prep import output_bytes, preprocess_path, preprocess_source
from writers import write_10x_v3, write_loom

# One cell a block, a few cells, and more than the file holds.
BLOCK_SIZES = (1, 7, 20_000)

REAL_FILES = {
    # file: (species, settings); e18 keeps 1,000 genes, the CELLxGENE example 7
    "human_pbmc1k_10x_cellranger6.h5": ("hsapiens", PreprocessSettings()),
    "human_pbmc5k_protein_v3_200cells.h5ad": ("hsapiens", PreprocessSettings()),
    "mouse_e18_brain_10k_cells_1000genes.h5ad": (
        "mmusculus",
        PreprocessSettings(min_genes=20, min_counts=50),
    ),
    "mouse_sympathetic_furlan2016.loom": ("mmusculus", PreprocessSettings()),
    "cellxgene_example_valid_2cells.h5ad": (
        "hsapiens",
        PreprocessSettings(min_genes=1, min_counts=1),
    ),
}


def assert_same_outputs(runs: list[dict[str, bytes]]) -> None:
    first = runs[0]
    assert len(first) == 10  # h5ad, statistics, QC record, cells, six shard files
    for other in runs[1:]:
        assert sorted(other) == sorted(first)
        for name in first:
            assert other[name] == first[name], f"{name} differs with another block size"


@pytest.mark.parametrize("file", sorted(REAL_FILES))
def test_real_file_outputs_do_not_depend_on_block_size(shared_data, human, mouse, tmp_path, file):
    species, settings = REAL_FILES[file]
    reference = human if species == "hsapiens" else mouse
    runs = []
    for block in BLOCK_SIZES:
        qc, out = preprocess_path(
            shared_data / file,
            reference,
            tmp_path / str(block),
            settings,
            species=species,
            block_cells=block,
            n_bins=51,
            exact_max_cells=50,  # histograms too, not only exact values
        )
        runs.append(output_bytes(out))
    assert qc["cells_kept"] > 0
    assert_same_outputs(runs)


@pytest.fixture(scope="module")
def demo_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_corpus(root, seed=0, n_cells=40)
    return root


DEMO_INPUTS = [
    (d.name, d.species, d.path, name)
    for d in DEMO_DATASETS
    for name in (
        ["retina_batch1", "retina_batch2"] if d.name == "demo_retina" else [Path(d.path).stem]
    )
]


@pytest.mark.parametrize(("dataset", "species", "path", "name"), DEMO_INPUTS)
def test_demo_outputs_do_not_depend_on_block_size(
    demo_corpus, human, mouse, tmp_path, dataset, species, path, name
):
    source = dataset_sources(dataset, demo_corpus / path).by_name()[name]
    reference = human if species == "hsapiens" else mouse
    runs = []
    for block in BLOCK_SIZES:
        qc, out = preprocess_source(
            source,
            reference,
            tmp_path / str(block),
            PreprocessSettings(),
            dataset=dataset,
            species=species,
            block_cells=block,
            exact_max_cells=5,
        )
        runs.append(output_bytes(out))
    assert 0 < qc["cells_kept"] < qc["cells_in"]  # the demo holds cells that fail QC
    assert_same_outputs(runs)


# --- each format in blocks equals the whole file read by its own library -----------------


SETTINGS = PreprocessSettings(min_genes=50, min_counts=400, max_mito_fraction=0.2)


def synthetic_counts(reference, n_cells: int = 60, n_genes: int = 200):
    """Counts with real gene IDs and symbols (one mitochondrial gene), some cells failing QC."""
    genes = protein_coding(reference, n_genes - 1, offset=500)
    mito = reference.table.filter(pl.col("gene_name").str.to_uppercase() == "MT-CO1")
    genes = pd.concat(
        [genes, mito.select("gene_id", "gene_name").to_pandas()], ignore_index=True
    ).reset_index(drop=True)
    X = count_matrix(n_cells, n_genes, seed=5).toarray()
    X[3] = 0
    X[3, :30] = 2  # too few genes
    X[10, -1] = X[10].sum() * 2  # mostly mitochondrial
    X[20] = np.ceil(X[20] / 20)  # too few counts
    cells = [f"AAAC{i:04d}-1" for i in range(n_cells)]
    return sp.csr_matrix(X), genes, cells


def expected_by_scanpy(adata: ad.AnnData, gene_ids: np.ndarray) -> ad.AnnData:
    """QC by scanpy (`calculate_qc_metrics`) on a whole AnnData of gene-expression counts."""
    adata = adata.copy()
    adata.var["mt"] = adata.var_names.str.upper().str.startswith("MT-")
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    keep = (
        (adata.obs["n_genes_by_counts"] >= SETTINGS.min_genes)
        & (adata.obs["total_counts"] >= SETTINGS.min_counts)
        & (adata.obs["pct_counts_mt"] / 100 <= SETTINGS.max_mito_fraction)
    ).to_numpy()
    out = adata[keep].copy()
    out.var_names = gene_ids
    return out


def blocks_read(monkeypatch, reader_class) -> list[int]:
    """Record the size of each block a reader class yields."""
    sizes: list[int] = []
    original = reader_class.blocks

    def blocks(self, location, block_cells):
        for start, block in original(self, location, block_cells):
            sizes.append(block.shape[0])
            yield start, block

    monkeypatch.setattr(reader_class, "blocks", blocks)
    return sizes


def assert_written_equals(path: Path, expected: ad.AnnData, qc: dict) -> None:
    written = ad.read_h5ad(path)
    assert list(written.obs_names) == list(expected.obs_names)
    assert list(written.var_names) == list(expected.var_names)
    assert np.array_equal(written.X.toarray(), np.asarray(sp.csr_matrix(expected.X).todense()))
    assert np.array_equal(written.obs["total_counts"], expected.obs["total_counts"])
    assert np.array_equal(written.obs["n_genes_by_counts"], expected.obs["n_genes_by_counts"])
    assert qc["cells_kept"] == expected.n_obs < qc["cells_in"]


def test_10x_h5_in_blocks_equals_scanpy(human, tmp_path, monkeypatch):
    X, genes, cells = synthetic_counts(human)
    antibodies = sp.csr_matrix(np.full((X.shape[0], 3), 500))  # would dilute mito_fraction
    path = write_10x_v3(
        tmp_path / "pbmc.h5",
        sp.hstack([X, antibodies]).tocsr(),
        cells,
        [*genes["gene_id"], "CD3", "CD4", "CD8"],
        [*genes["gene_name"], "CD3", "CD4", "CD8"],
        feature_types=["Gene Expression"] * len(genes) + ["Antibody Capture"] * 3,
    )
    sizes = blocks_read(monkeypatch, readers.TenxH5Reader)
    qc, out = preprocess_path(path, human, tmp_path / "out", SETTINGS, block_cells=7)
    assert len(sizes) > 5 and max(sizes) == 7
    whole = sc.read_10x_h5(path)  # gene expression only
    assert_written_equals(out.h5ad, expected_by_scanpy(whole, whole.var["gene_ids"].to_numpy()), qc)
    assert qc["counts_left_out"] == {"Antibody Capture": 500 * 3 * X.shape[0]}


def test_h5ad_raw_x_in_blocks_equals_anndata(human, tmp_path, monkeypatch):
    X, genes, cells = synthetic_counts(human)
    raw = ad.AnnData(
        X=X.astype(np.float32),
        obs=pd.DataFrame(index=cells),
        var=pd.DataFrame({"gene_name": genes["gene_name"].to_numpy()}, index=genes["gene_id"]),
    )
    adata = raw.copy()
    adata.X = sp.csr_matrix(np.log1p(X.toarray()) / 3)  # normalized, as CELLxGENE has it
    adata.raw = raw
    path = tmp_path / "cxg.h5ad"
    adata.write_h5ad(path)
    sizes = blocks_read(monkeypatch, readers.H5adReader)
    qc, out = preprocess_path(path, human, tmp_path / "out", SETTINGS, block_cells=7)
    assert qc["counts_source"] == "raw.X"
    assert len(sizes) > 5 and max(sizes) == 7
    whole = ad.read_h5ad(path).raw.to_adata()
    whole.var_names = whole.var["gene_name"].to_numpy()
    assert_written_equals(out.h5ad, expected_by_scanpy(whole, genes["gene_id"].to_numpy()), qc)


def test_loom_in_blocks_equals_whole_matrix(mouse, tmp_path, monkeypatch):
    X, genes, cells = synthetic_counts(mouse)
    path = write_loom(
        tmp_path / "retina.loom",
        X.toarray().astype(np.uint16),
        row_attrs={"Gene": genes["gene_name"].to_numpy()},
        col_attrs={"CellID": cells, "cluster": np.arange(len(cells)) % 3},
        chunks=(16, 16),
    )
    sizes = blocks_read(monkeypatch, readers.LoomReader)
    qc, out = preprocess_path(
        path, mouse, tmp_path / "out", SETTINGS, species="mmusculus", block_cells=7
    )
    assert len(sizes) > 5 and max(sizes) == 7
    assert qc["mapping_kind"] == "symbol" and qc["mapping_rate"] == 1.0
    with h5py.File(path) as handle:  # the whole matrix, genes x cells
        whole = ad.AnnData(
            X=sp.csr_matrix(handle["matrix"][()].T.astype(np.int64)),
            obs=pd.DataFrame(index=handle["col_attrs/CellID"][()].astype(str)),
            var=pd.DataFrame(index=handle["row_attrs/Gene"][()].astype(str)),
        )
    symbol_to_id = dict(zip(genes["gene_name"], genes["gene_id"], strict=True))
    expected = expected_by_scanpy(whole, np.array([symbol_to_id[s] for s in whole.var_names]))
    assert_written_equals(out.h5ad, expected, qc)
    written = ad.read_h5ad(out.h5ad)
    assert list(written.obs["cluster"]) == list(
        np.arange(len(cells))[np.isin(cells, expected.obs_names)] % 3
    )


def test_dense_blocks_capped_by_bytes_give_the_same_outputs(
    make_adata, human, tmp_path, monkeypatch
):
    adata = make_adata(n_cells=50, n_genes=120)
    adata.X = adata.X.toarray()  # dense float32, as many older h5ad files hold counts
    h5ad = tmp_path / "dense.h5ad"
    adata.write_h5ad(h5ad)
    loom = write_loom(
        tmp_path / "dense.loom",
        adata.X.astype(np.int32),
        row_attrs={"Accession": adata.var_names.to_numpy()},
        col_attrs={"CellID": adata.obs_names.to_numpy()},
    )
    sizes = {h5ad: blocks_read(monkeypatch, readers.H5adReader)}
    sizes[loom] = blocks_read(monkeypatch, readers.LoomReader)
    runs: dict[Path, list] = {h5ad: [], loom: []}
    for cap in (None, 120 * 4 * 3):  # at most 3 cells of 4-byte values a block
        if cap is not None:
            monkeypatch.setattr(readers, "DENSE_BLOCK_BYTES", cap)
        for path in (h5ad, loom):
            sizes[path].clear()
            _, out = preprocess_path(path, human, tmp_path / f"{cap}{path.suffix}", block_cells=16)
            runs[path].append(output_bytes(out))
            assert max(sizes[path]) == (16 if cap is None else 3)
    for outputs in runs.values():
        assert_same_outputs(outputs)
