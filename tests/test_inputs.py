"""What a file holds that must not be counted or guessed (issue 13, kinds 1-3 and 5): features
that are not genes of the species, another species' genes, the same cells twice, missing
annotations."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import pytest
import scanpy as sc
import scipy.sparse as sp

from cellfoundry.cli import main
from cellfoundry.config import validate_config
from cellfoundry.errors import DatasetError
from cellfoundry.loader import ShardCollection
from cellfoundry.preprocess import PreprocessSettings
from cellfoundry.vocabulary import from_genes
from conftest import count_matrix, protein_coding
from prep import output_bytes, preprocess_dataset, preprocess_path
from writers import write_10x_v3

# --- kind 1: only gene-expression features of the species count ---------------------------


def test_cite_seq_h5ad_counts_genes_only_as_the_h5_does(shared_data, human, tmp_path):
    h5 = shared_data / "human_pbmc1k_10x_cellranger6.h5"
    adata = sc.read_10x_h5(h5, gex_only=False)  # antibody capture in var['feature_types']
    antibodies = (adata.var["feature_types"] == "Antibody Capture").to_numpy()
    assert antibodies.sum() == 10
    path = tmp_path / "pbmc1k.h5ad"
    adata.write_h5ad(path)
    from_h5ad, out = preprocess_path(path, human, tmp_path / "h5ad", PreprocessSettings())
    from_h5, out_h5 = preprocess_path(h5, human, tmp_path / "h5", PreprocessSettings())
    assert from_h5ad["cells_kept"] == from_h5["cells_kept"] == 827  # 869 with antibodies
    assert from_h5ad["features_left_out"] == {"Antibody Capture": 10}
    assert from_h5ad["counts_left_out"] == {"Antibody Capture": int(adata.X[:, antibodies].sum())}
    assert (
        from_h5ad["counts_total"] == from_h5["counts_total"] == int(adata.X[:, ~antibodies].sum())
    )
    assert from_h5ad["genes_counted"] == 36_601
    # The same cells, genes and counts in the h5ad and the shard, whatever the container (the
    # bins' random tie-break is seeded by the file's name).
    a, b = output_bytes(out), output_bytes(out_h5)
    for name in ("shard/indptr.npy", "shard/total_counts.npy", "gene_stats"):
        assert a[name] == b[name]
    entries = [np.load(o.shard / "entries.npy") for o in (out, out_h5)]
    for field in ("gene", "count"):
        assert np.array_equal(entries[0][field], entries[1][field])
    assert ad.read_h5ad(out.h5ad).obs_names.equals(ad.read_h5ad(out_h5.h5ad).obs_names)


def test_spike_ins_and_other_feature_types_are_left_out_and_counted(human, tmp_path):
    genes = protein_coding(human, 80)
    X = count_matrix(40, 80, seed=4)
    extra = sp.csr_matrix(np.full((40, 4), 30.0))
    var = pd.DataFrame(
        {
            "gene_symbols": [*genes["gene_name"], "ERCC", "ERCC", "CD3", "HTO1"],
            "feature_types": ["Gene Expression"] * 82
            + ["Antibody Capture", "Multiplexing Capture"],
        },
        index=[*genes["gene_id"], "ERCC-00002", "ERCC-00130", "CD3_TotalSeqB", "HTO_1"],
    )
    path = tmp_path / "mixed.h5ad"
    ad.AnnData(X=sp.hstack([X, extra]).tocsr(), var=var).write_h5ad(path)
    qc, out = preprocess_path(path, human, tmp_path / "out", block_cells=9)
    assert qc["features_left_out"] == {
        "Antibody Capture": 1,
        "Multiplexing Capture": 1,
        "ERCC spike-in": 2,
    }
    assert qc["counts_left_out"] == {
        "Antibody Capture": 1200,
        "Multiplexing Capture": 1200,
        "ERCC spike-in": 2400,
    }
    assert qc["genes_counted"] == qc["genes_mapped"] == 80 and qc["mapping_rate"] == 1.0
    cells = pl.read_parquet(out.cells)
    assert np.array_equal(cells["total_counts"].to_numpy(), np.asarray(X.sum(1)).ravel())


# --- kind 2: another species' genes fail ------------------------------------------------------


def test_mouse_symbols_declared_human_fail_naming_mouse(shared_data, human, tmp_path):
    path = shared_data / "mouse_sympathetic_furlan2016.loom"
    with pytest.raises(DatasetError) as error:
        preprocess_path(path, human, tmp_path, PreprocessSettings())
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(
        f"dataset 'ds', file '{path}': genes look like mmusculus, not hsapiens: "
    )
    exact = int(text.split(" of 16892 symbols match mmusculus symbols exactly")[0].split()[-1])
    assert exact > 15_000  # the mouse reference matches them as written
    assert "fix the species in the dataset sheet" in text
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_human_symbols_declared_human_pass(shared_data, human, tmp_path):
    qc, _ = preprocess_path(
        shared_data / "human_pbmc5k_protein_v3_200cells.h5ad", human, tmp_path, PreprocessSettings()
    )
    assert qc["mapping_kind"] == "symbol"
    assert qc["mapping_matches"]["exact"] > 50 * qc["mapping_matches"].get("case", 0)


def test_mouse_ids_declared_human_fail_naming_mouse(mouse, human, tmp_path):
    genes = protein_coding(mouse, 100)
    adata = ad.AnnData(X=count_matrix(20, 100), var=pd.DataFrame(index=genes["gene_id"]))
    path = tmp_path / "mouse.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(
        DatasetError,
        match=r"only 0 of 100 genes \(0.0%\) map to the hsapiens reference .* they look like "
        r"mmusculus genes \(100 of 100 IDs start with ENSMUSG\)",
    ):
        preprocess_path(path, human, tmp_path / "out")


# --- kind 3: the same cells twice are never split between training and validation ------------


def run_default_split(root: Path, qc_path: Path, manifest: Path, val_fraction: float) -> Path:
    """The CLI stages after preprocessing: default split, then the shard manifest."""
    settings = validate_config({"splits": {"val_fraction": val_fraction}})["splits"]
    common = ["--manifests", str(manifest)]
    assert (
        main(
            [
                "splits",
                "--settings",
                json.dumps(settings),
                "--qc",
                str(qc_path),
                *common,
                "--project-path",
                str(root),
                "--out",
                str(root / "splits.parquet"),
                "--holdout",
                str(root / "holdout.parquet"),
                "--split-dir",
                str(root / "splits"),
            ]
        )
        == 0
    )
    out = root / "shards.parquet"
    assert (
        main(
            [
                "shard-manifest",
                "--splits",
                str(root / "splits.parquet"),
                "--holdout",
                str(root / "holdout.parquet"),
                *common,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def cell_names(rows: pl.DataFrame) -> list[tuple[str, str]]:
    """(file, cell name) of every cell a manifest's rows select."""
    names = []
    for row in rows.iter_rows(named=True):
        obs = pl.read_parquet(Path(row["shard"]) / "obs.parquet")["obs_name"].to_numpy()
        cells = np.arange(len(obs))
        if row["cells"] == "holdout":
            cells = np.array(row["holdout"])
        elif row["cells"] == "rest":
            cells = np.setdiff1d(cells, row["holdout"])
        names += [(row["file"], str(name)) for name in obs[cells]]
    return names


def test_files_sharing_barcodes_are_held_out_together(human, tmp_path):
    genes = protein_coding(human, 80)
    n = 60
    X = count_matrix(n, 80, seed=7)
    barcodes = [f"AAACCTG{i:05d}-1" for i in range(n)]
    # A raw matrix: the cells and many empty droplets (real ones hold 10^5-10^6), in barcode
    # order. Sketches of all barcodes would see almost none of the cells' among the union's
    # 256 smallest hashes (none for these names): sketches are of the cells kept.
    droplets = 50_000
    empty = sp.csr_matrix(
        (np.ones(droplets), (np.arange(droplets), np.arange(droplets) % 80)), shape=(droplets, 80)
    )
    raw_barcodes = np.array(barcodes + [f"TTTG{i:05d}-1" for i in range(droplets)])
    order = np.argsort(raw_barcodes)
    folder = tmp_path / "sample"  # two files of one sample, not in Cell Ranger's layout
    folder.mkdir()
    ids, names = genes["gene_id"], genes["gene_name"]
    write_10x_v3(folder / "filtered.h5", X, barcodes, ids, names)
    write_10x_v3(
        folder / "raw.h5", sp.vstack([X, empty]).tocsr()[order], raw_barcodes[order], ids, names
    )
    other = count_matrix(n, 80, seed=8)
    write_10x_v3(folder / "other.h5", other, [f"GGGT{i:05d}-1" for i in range(n)], ids, names)
    qc, _, out = preprocess_dataset(folder, human, tmp_path / "project", dataset="sample")
    assert [f["cells_kept"] for f in qc["files"]] == [n, n, n]
    assert qc["shared_barcodes"] == [["filtered", "raw"]]
    manifest = run_default_split(tmp_path / "project", out.qc, out.shard_manifest, 0.3)
    rows = pl.read_parquet(manifest)
    train = cell_names(rows.filter(pl.col("split") == "train"))
    val = cell_names(rows.filter(pl.col("split") == "val"))
    held = {f: {c for g, c in val if g == f} for f in ("filtered.h5ad", "raw.h5ad", "other.h5ad")}
    assert held["filtered.h5ad"] == held["raw.h5ad"] and 5 < len(held["raw.h5ad"]) < 35
    assert held["other.h5ad"]
    assert not {c for _, c in train} & {c for _, c in val}  # validation cells are never trained on
    assert len(train) + len(val) == 3 * n
    # The loader serves exactly these rows.
    mapping = {"hsapiens": from_genes("hsapiens", sorted(ids), human)}
    for split, expected in (("train", train), ("val", val)):
        collection = ShardCollection(rows.filter(pl.col("split") == split), mapping)
        assert len(collection) == len(expected)


# --- kind 5: missing stays missing ----------------------------------------------------------


def test_missing_obs_values_stay_missing(make_adata, human, tmp_path):
    adata = make_adata(n_cells=30)
    missing = np.arange(30) % 3 == 0
    adata.obs["cell_type"] = pd.Categorical(
        np.where(missing, None, adata.obs["cell_type"].astype(object))
    )
    adata.obs["donor"] = pd.array(np.where(missing, None, "d1"), dtype="string")
    adata.obs["age"] = np.where(missing, np.nan, 42.0)
    adata.obs["batch"] = pd.array(np.where(missing, None, 2), dtype="Int64")
    adata.obs["free_text"] = np.where(missing, None, "note").astype(object)
    adata.obs["is_primary"] = pd.array(np.where(missing, None, True), dtype="boolean")
    path = tmp_path / "labels.h5ad"
    adata.write_h5ad(path)
    settings = PreprocessSettings(min_genes=1, min_counts=1, max_mito_fraction=1.0)
    qc, out = preprocess_path(path, human, tmp_path / "out", settings, block_cells=7)
    assert qc["cells_kept"] == 30
    written = ad.read_h5ad(out.h5ad).obs
    shard = pl.read_parquet(out.shard / "obs.parquet")
    columns = ["cell_type", "donor", "age", "batch", "free_text", "is_primary"]
    for column in columns:
        assert np.array_equal(written[column].isna().to_numpy(), missing), column
        assert shard[column].is_null().to_numpy().tolist() == missing.tolist(), column
        text = {str(v) for v in written[column].dropna()} | set(
            map(str, shard[column].drop_nulls().to_list())
        )
        assert not text & {"nan", "NaN", "<NA>", "None", ""}, column
    assert set(written["cell_type"].dropna()) == {"B cell", "T cell"}
    assert written["age"].dropna().unique().tolist() == [42.0]
    assert written["batch"].dropna().unique().tolist() == [2.0]
