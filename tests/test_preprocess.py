"""Stage 2: reading, counts detection and validation, gene mapping, QC and the bad-input cases."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfoundry.errors import DatasetError
from cellfoundry.preprocess import (
    DatasetOutputs,
    PreprocessSettings,
    find_counts,
    map_genes,
    preprocess_dataset,
    preprocess_file,
)
from cellfoundry.readers import dataset_files, read_file

LOOSE = PreprocessSettings(min_genes=10, min_counts=50, max_mito_fraction=0.5)


def outputs(root: Path, dataset: str = "ds") -> DatasetOutputs:
    return DatasetOutputs(
        root / "data" / dataset / "h5ads",
        root / "stats" / f"{dataset}.parquet",
        root / "qc" / dataset / "qc.json",
        root / "qc" / dataset / "qc.png",
        root / "provenance" / f"{dataset}.json",
    )


def written(out: DatasetOutputs) -> list[Path]:
    paths = [out.h5ad_dir, out.gene_stats, out.qc_json, out.qc_plot, out.provenance]
    return [p for p in paths if p.exists()]


def test_counts_found_in_layer_raw_or_x(make_adata):
    adata = make_adata()
    counts = adata.X.copy()
    adata.layers["counts"] = counts
    adata.X = sp.csr_matrix(np.log1p(counts.toarray()))
    found = find_counts(adata, "auto", "ds", Path("f.h5ad"))
    assert found.source == "layers/counts"
    assert (counts != found.X).nnz == 0
    assert found.X.dtype == np.int32

    del adata.layers["counts"]
    raw = adata.copy()
    raw.X = counts
    adata.raw = raw
    assert find_counts(adata, "auto", "ds", Path("f.h5ad")).source == "raw.X"

    with pytest.raises(DatasetError, match=r"X holds \d+ non-integer values"):
        find_counts(adata, "X", "ds", Path("f.h5ad"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "NaN values"),
        (-3.0, "negative values"),
        (np.inf, "infinite values"),
        (2.5, "non-integer values"),
    ],
)
def test_bad_counts_name_dataset_file_and_problem(make_adata, value, message):
    adata = make_adata()
    X = adata.X.toarray()
    X[4, 7] = value
    adata.X = sp.csr_matrix(X)
    with pytest.raises(DatasetError, match=message) as error:
        find_counts(adata, "auto", "pbmc", Path("pbmc.h5ad"))
    text = str(error.value)
    assert text.startswith("dataset 'pbmc', file 'pbmc.h5ad': no raw counts: X holds 1 ")
    assert "first in cell 'cell4'" in text


def test_near_integers_are_rounded_with_a_warning(make_adata, caplog):
    adata = make_adata()
    original = adata.X.copy()
    adata.X = adata.X.astype(np.float64)
    adata.X.data = adata.X.data + 4e-7
    found = find_counts(adata, "auto", "ds", Path("f.h5ad"))
    assert found.n_rounded == original.nnz
    assert (original != found.X).nnz == 0
    assert "were rounded" in caplog.text


def test_map_ids_strips_versions_and_drops_unknown(human):
    var = pd.DataFrame(
        index=["ENSG00000141510.18", "ENSG00000000003", "ENSG99999999999", "ERCC-00002"]
    )
    mapping = map_genes(var, human)
    assert mapping.kind == "ensembl_id"
    assert list(mapping.gene_ids) == ["ENSG00000141510", "ENSG00000000003", None, None]


def test_map_symbols_resolves_made_unique_duplicates(human):
    var = pd.DataFrame(index=["TP53", "TSPAN6", "TSPAN6-1", "NOT_A_GENE", "mt-co1"])
    mapping = map_genes(var, human)
    assert mapping.kind == "symbol"
    assert mapping.gene_ids[0] == "ENSG00000141510"
    assert mapping.gene_ids[1] == mapping.gene_ids[2] == "ENSG00000000003"
    assert mapping.gene_ids[3] is None
    assert mapping.gene_ids[4] is not None  # case-insensitive fallback


def test_duplicate_genes_are_summed_or_first(make_adata, human):
    adata = make_adata(n_cells=30, n_genes=50)
    ids = adata.var_names.to_numpy().copy()
    ids[1] = ids[0]  # two columns for one gene
    adata.var_names = ids
    adata.var_names_make_unique()  # "ID-1": a symbol-style suffix is not an ID, so it stays unmapped
    var = pd.DataFrame(index=ids)
    X = adata.X
    summed = preprocess_file_like(X, var, human, "sum")
    first = preprocess_file_like(X, var, human, "first")
    column = np.searchsorted(summed.var_names, ids[0])
    assert np.array_equal(
        summed.X[:, column].toarray().ravel(), (X[:, 0] + X[:, 1]).toarray().ravel()
    )
    assert np.array_equal(first.X[:, column].toarray().ravel(), X[:, 0].toarray().ravel())
    assert summed.n_vars == first.n_vars == 49


def preprocess_file_like(X, var, reference, how, tmp=Path("/tmp")):
    from cellfoundry.preprocess import _collapse_genes

    mapping = map_genes(var, reference)
    out, ids, _ = _collapse_genes(sp.csr_matrix(X, dtype=np.int32), mapping.gene_ids, how)
    return ad.AnnData(X=out, var=pd.DataFrame(index=ids))


def test_preprocess_file_filters_cells_and_keeps_counts(make_adata, human, tmp_path):
    adata = make_adata(n_cells=80, n_genes=300)
    X = adata.X.toarray()
    X[0] = 0
    X[0, :5] = 1  # 5 genes, 5 counts: fails min_genes and min_counts
    X[1, -1] = X[1].sum() * 3  # mitochondrial gene dominates: fails max_mito_fraction
    adata.X = sp.csr_matrix(X)
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    result = preprocess_file("ds", "hsapiens", path, human, LOOSE)
    out = result.adata
    assert result.qc["cells_in"] == 80
    assert result.qc["cells_kept"] == 78
    assert result.qc["cells_failed"]["max_mito_fraction"] == 1
    assert "cell0" not in out.obs_names and "cell1" not in out.obs_names
    assert out.X.dtype == np.int32
    assert list(out.var_names) == sorted(out.var_names)
    assert {"gene_name", "gene_type"} <= set(out.var.columns)
    assert {"total_counts", "n_genes_by_counts", "mito_fraction", "cell_type"} <= set(
        out.obs.columns
    )
    # raw integer counts survive: per-cell sums over the kept genes equal the input's
    kept = adata[out.obs_names]
    assert np.array_equal(np.asarray(out.X.sum(1)).ravel(), np.asarray(kept.X.sum(1)).ravel())
    assert np.allclose(out.obs["total_counts"], np.asarray(kept.X.sum(1)).ravel())


def test_dataset_outputs_written_and_deterministic(make_adata, human, tmp_path):
    adata = make_adata()
    folder = tmp_path / "in"
    folder.mkdir()
    adata[:30].copy().write_h5ad(folder / "a.h5ad")
    adata[30:].copy().write_h5ad(folder / "b.h5ad")
    digests = []
    for run in ("one", "two"):
        out = outputs(tmp_path / run)
        preprocess_dataset("ds", "hsapiens", folder, human, LOOSE, out)
        assert sorted(p.name for p in out.h5ad_dir.iterdir()) == ["a.h5ad", "b.h5ad"]
        qc = json.loads(out.qc_json.read_text())
        assert [f["file"] for f in qc["files"]] == ["a.h5ad", "b.h5ad"]
        provenance = json.loads(out.provenance.read_text())
        assert len(provenance["inputs"]) == 2 and all(
            len(i["sha256"]) == 64 for i in provenance["inputs"]
        )
        assert provenance["versions"]["anndata"] == version("anndata")
        digests.append(
            [p.read_bytes() for p in sorted(out.h5ad_dir.iterdir())] + [out.gene_stats.read_bytes()]
        )
    assert digests[0] == digests[1]


def test_failure_leaves_no_partial_output(make_adata, human, tmp_path):
    adata = make_adata()
    folder = tmp_path / "in"
    folder.mkdir()
    adata.write_h5ad(folder / "a.h5ad")
    bad = adata.copy()
    bad.X = bad.X * 0.5  # non-integer
    bad.write_h5ad(folder / "b.h5ad")
    out = outputs(tmp_path / "out")
    with pytest.raises(DatasetError, match=r"dataset 'ds', file '.*b.h5ad': no raw counts"):
        preprocess_dataset("ds", "hsapiens", folder, human, LOOSE, out)
    assert written(out) == []
    assert not list((tmp_path / "out").rglob("*.h5ad"))


def test_too_few_genes_mapping_fails(make_adata, mouse, tmp_path):
    path = tmp_path / "human.h5ad"
    make_adata().write_h5ad(path)
    with pytest.raises(
        DatasetError,
        match=r"only 0 of 300 genes \(0.0%\) map to the mmusculus reference.*Wrong species",
    ):
        preprocess_file("ds", "mmusculus", path, mouse, LOOSE)


def test_empty_after_qc_fails(make_adata, human, tmp_path):
    path = tmp_path / "shallow.h5ad"
    make_adata(depth=50).write_h5ad(path)
    with pytest.raises(
        DatasetError, match=r"no cell passes QC \(60 cells; min_genes=200 removes 60"
    ):
        preprocess_file("ds", "hsapiens", path, human, PreprocessSettings())


def test_species_without_reference_fails(make_adata, tmp_path):
    path = tmp_path / "cow.h5ad"
    make_adata().write_h5ad(path)
    out = outputs(tmp_path / "out", "cow")
    with pytest.raises(
        DatasetError,
        match=r"dataset 'cow', file '.*cow.h5ad': species 'btaurus' has no gene reference",
    ):
        preprocess_dataset("cow", "btaurus", path, None, LOOSE, out)
    assert written(out) == []


def test_truncated_and_unsupported_files(make_adata, tmp_path):
    path = tmp_path / "cut.h5ad"
    make_adata().write_h5ad(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DatasetError, match=r"dataset 'ds', file '.*cut.h5ad': cannot be read as h5ad"
    ):
        read_file("ds", path)
    text = tmp_path / "notes.csv"
    text.write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"unsupported format '\.csv'"):
        dataset_files("ds", text)
    with pytest.raises(DatasetError, match="no such file or folder"):
        dataset_files("ds", tmp_path / "missing.h5ad")


def test_mixed_organisms_fail(make_adata, human, tmp_path):
    adata = make_adata()
    adata.obs["organism_ontology_term_id"] = np.where(
        np.arange(adata.n_obs) % 3, "NCBITaxon:9606", "NCBITaxon:10090"
    )
    path = tmp_path / "mixed.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(
        DatasetError, match=r"several organisms \(NCBITaxon:10090, NCBITaxon:9606\)"
    ):
        preprocess_file("ds", "hsapiens", path, human, LOOSE)


def test_loom_and_10x_readers(make_adata, human, tmp_path):
    adata = make_adata(n_cells=20, n_genes=40)
    dense = adata.X.toarray().astype(np.int64)
    loom = tmp_path / "x.loom"
    with h5py.File(loom, "w") as handle:
        handle["matrix"] = dense.T
        handle.create_group("row_attrs")["Gene"] = np.array(
            adata.var["gene_name"].to_list(), dtype="S"
        )
        handle.create_group("col_attrs")["CellID"] = np.array(adata.obs_names.to_list(), dtype="S")
        handle.create_group("layers")
    read = read_file("ds", loom)
    assert read.shape == (20, 40)
    assert np.array_equal(read.X.toarray(), dense)
    assert list(read.obs_names) == list(adata.obs_names)
    assert map_genes(read.var, human).rate == 1.0

    tenx = tmp_path / "x.h5"
    csc = sp.csc_matrix(dense.T)  # features x barcodes, stored by barcode
    with h5py.File(tenx, "w") as handle:
        group = handle.create_group("matrix")
        group["data"], group["indices"], group["indptr"] = (
            csc.data.astype(np.int32),
            csc.indices,
            csc.indptr,
        )
        group["shape"] = np.array(csc.shape, dtype=np.int32)
        group["barcodes"] = np.array(adata.obs_names.to_list(), dtype="S")
        features = group.create_group("features")
        features["id"] = np.array(adata.var_names.to_list(), dtype="S")
        features["name"] = np.array(adata.var["gene_name"].to_list(), dtype="S")
        types = ["Gene Expression"] * 38 + ["Antibody Capture"] * 2
        features["feature_type"] = np.array(types, dtype="S")
    read = read_file("ds", tenx)
    assert read.shape == (20, 38)
    assert np.array_equal(read.X.toarray(), dense[:, :38])
    assert list(read.var_names) == list(adata.var_names[:38])


@pytest.mark.parametrize(
    ("file", "species", "counts_source", "min_rate"),
    [
        ("human_pbmc1k_10x_cellranger6.h5", "hsapiens", "X", 0.95),
        ("human_pbmc5k_protein_v3_200cells.h5ad", "hsapiens", "X", 0.80),
        ("mouse_e18_brain_10k_cells_1000genes.h5ad", "mmusculus", "X", 0.95),
        ("mouse_sympathetic_furlan2016.loom", "mmusculus", "X", 0.85),
        ("cellxgene_example_valid_2cells.h5ad", "hsapiens", "raw.X", 0.99),
    ],
)
def test_real_datasets(shared_data, human, mouse, file, species, counts_source, min_rate):
    reference = human if species == "hsapiens" else mouse
    settings = PreprocessSettings(min_genes=1, min_counts=1, max_mito_fraction=1.0)
    result = preprocess_file("real", species, shared_data / file, reference, settings)
    assert result.qc["counts_source"] == counts_source
    assert result.qc["mapping_rate"] >= min_rate
    assert result.qc["mapped_counts_fraction"] >= result.qc["mapping_rate"] - 0.05
    X = result.adata.X
    assert X.dtype == np.int32 and X.data.min() > 0
    assert result.adata.var_names.str.startswith("ENS").all()
    if file.endswith(".h5"):  # antibody-capture features are not genes
        assert result.qc["genes_in"] == 36601


def test_invalid_cellxgene_file_fails_clearly(shared_data, human):
    path = shared_data / "bad_cellxgene_example_invalid.h5ad"
    with pytest.raises(DatasetError, match="cells come from several organisms"):
        preprocess_file("bad", "hsapiens", path, human, LOOSE)


def test_gene_stats_are_mergeable(make_adata, human, tmp_path):
    from cellfoundry.gene_stats import merge_gene_stats

    adata = make_adata(n_cells=100)
    adata[:40].copy().write_h5ad(tmp_path / "a.h5ad")
    adata[40:].copy().write_h5ad(tmp_path / "b.h5ad")
    a = preprocess_file("ds", "hsapiens", tmp_path / "a.h5ad", human, LOOSE).gene_stats
    b = preprocess_file("ds", "hsapiens", tmp_path / "b.h5ad", human, LOOSE).gene_stats
    merged = merge_gene_stats([a, b])
    assert merged.equals(merge_gene_stats([b, a]))
    assert merged["n_obs"].max() == 100
    whole = ad.AnnData(adata.X)
    assert np.array_equal(
        merged.sort("gene_id")["n_cells"].to_numpy(),
        np.asarray((whole.X > 0).sum(0)).ravel()[np.argsort(adata.var_names)],
    )
