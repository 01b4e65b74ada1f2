"""Stages 3-5: vocabulary, panels, split expansion; and config validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scanpy as sc
import scipy.sparse as sp
import yaml

from cellfoundry import panels, splits, vocabulary
from cellfoundry.config import dataset_settings, read_dataset_sheet, validate_config
from cellfoundry.errors import ConfigError
from cellfoundry.gene_stats import GeneStatsAccumulator, merge_gene_stats, summarize
from conftest import REPO

SCHEMAS = REPO / "workflow" / "schemas"


def stats_of(adata) -> pl.DataFrame:
    X = sp.csr_matrix(adata.X)
    stats = GeneStatsAccumulator(adata.n_vars)
    stats.add_cells(X.indptr, X.indices, X.data, np.asarray(X.sum(1)).ravel())
    return stats.table(adata.var_names.to_numpy())


# --- vocabulary -------------------------------------------------------------------------


def test_vocabulary_from_corpus(make_adata, human, tmp_path):
    adata = make_adata()
    X = adata.X.tolil()
    X[:, 0] = 0
    X[:2, 0] = 1  # detected in 2 cells only
    adata.X = X.tocsr()
    stats = merge_gene_stats([stats_of(adata)])
    mapping = vocabulary.build_vocabulary("hsapiens", stats, human, min_cells=3)
    genes = mapping.gene_table["gene_id"].to_list()
    assert adata.var_names[0] not in genes
    assert genes == sorted(genes)
    assert (mapping.cls_id, mapping.pad_id, mapping.mask_id) == (0, 1, 2)
    assert mapping.table["token"].to_list() == list(range(mapping.table.height))
    path = tmp_path / "hsapiens.csv"
    vocabulary.write_token_mapping(mapping, path)
    lines = path.read_text().splitlines()
    assert lines[:3] == ["gene_id,gene_name,token", '<cls>,"",0', '<pad>,"",1']
    assert vocabulary.read_token_mapping("hsapiens", path).table.equals(mapping.table)
    assert mapping.tokens([genes[0], "ENSG_NOPE"]).tolist() == [3, -1]


def test_import_token_mapping_csv_keeps_ids(tmp_path, human):
    path = tmp_path / "mapping.csv"
    path.write_text(
        "gene_id,gene_name,token\n<cls>,,0\n<pad>,,1\nENSG00000141510,TP53,2\nENSG00000000003,TSPAN6,3\n"
    )
    mapping = vocabulary.import_token_mapping("hsapiens", path, human)
    assert mapping.token_of("ENSG00000141510") == 2
    assert mapping.mask_id == 4  # appended, so gene tokens stay where they were
    bad = tmp_path / "bad.csv"
    bad.write_text("gene_id,gene_name,token\n<pad>,,0\n<cls>,,1\n")
    with pytest.raises(ConfigError, match="<cls> must be token 0"):
        vocabulary.import_token_mapping("hsapiens", bad, human)


def test_import_geneformer_vocabulary(shared_data, human):
    mapping = vocabulary.import_token_mapping(
        "hsapiens", shared_data / "geneformer_vocab.txt", human
    )
    lines = (shared_data / "geneformer_vocab.txt").read_text().split()
    assert mapping.gene_table.height == len(lines) - 2 == 25_424
    assert mapping.gene_table["gene_id"][0] == lines[2]
    assert mapping.token_of(lines[2]) == 3


# --- panels -----------------------------------------------------------------------------


def test_hvg_panel_equals_scanpy_seurat(make_adata, human):
    adata = make_adata(n_cells=300, n_genes=400, seed=3)
    stats = summarize(merge_gene_stats([stats_of(adata)]))
    mapping = vocabulary.from_genes("hsapiens", sorted(adata.var_names), human)
    panel = panels.hvg_panel("hsapiens", stats, mapping, n_top_genes=50)
    ours = set(panel.table["Ensembl_ID"].to_list())

    reference = adata.copy()
    sc.pp.normalize_total(reference, target_sum=1e4)
    sc.pp.log1p(reference)
    sc.pp.highly_variable_genes(reference, flavor="seurat", n_top_genes=50)
    theirs = set(reference.var_names[reference.var["highly_variable"]])
    assert ours == theirs


def test_user_panel_reports_unknown_ids(tmp_path, human):
    mapping = vocabulary.from_genes("hsapiens", ["ENSG00000000003", "ENSG00000141510"], human)
    path = tmp_path / "panel.csv"
    path.write_text("Ensembl_ID\nENSG00000141510\nENSG00000000003.15\nENSG00000000005\nnot-an-id\n")
    panel = panels.user_panel("mine", "hsapiens", path, human, mapping)
    assert panel.table["Ensembl_ID"].to_list() == ["ENSG00000000003", "ENSG00000141510"]
    assert panel.unknown == ["ENSG00000000005", "not-an-id"]
    symbols = tmp_path / "symbols.csv"
    symbols.write_text("gene_name\nTP53\nNOPE\n")
    assert panels.user_panel("s", "hsapiens", symbols, human, mapping).unknown == ["NOPE"]
    empty = tmp_path / "empty.csv"
    empty.write_text("Ensembl_ID\nENSG00000000005\n")
    with pytest.raises(ConfigError, match="none of its 1 genes is in the hsapiens vocabulary"):
        panels.user_panel("e", "hsapiens", empty, human, mapping)


# --- splits -----------------------------------------------------------------------------


def write_split(folder: Path, name: str, body: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def test_split_files_expand_with_interpolation(tmp_path):
    project = tmp_path / "proj"
    for dataset, files in {"lung": ["a.h5ad", "b.h5ad", "c.h5ad"], "blood": ["x.h5ad"]}.items():
        folder = project / "data" / dataset / "h5ads"
        folder.mkdir(parents=True)
        for f in files:
            (folder / f).touch()
    source = {"source_path": "${PATH.PROJECT_PATH}/data/${.source_name}/h5ads"}
    write_split(
        tmp_path,
        "lung_split",
        {
            "source_name": "lung",
            "species": "hsapiens",
            **source,
            "train": ["a.h5ad", "b.h5ad"],
            "val": ["c.h5ad"],
        },
    )
    write_split(
        tmp_path,
        "blood_split",
        {"source_name": "blood", "species": "hsapiens", **source, "val": []}
        | {"train": ["x.h5ad"]},
    )
    loaded = {
        n: splits.load_split_file(tmp_path / f"{n}.yaml", str(project))
        for n in ("lung_split", "blood_split")
    }
    assert loaded["lung_split"].source_path == f"{project}/data/lung/h5ads"
    manifest = splits.expand(
        {
            "train": ["lung_split", "blood_split"],
            "val": ["lung_split", {"source": "blood_split", "key": "train"}],
        },
        loaded,
        datasets={"lung": "hsapiens", "blood": "hsapiens"},
    )
    rows = set(manifest.select("split", "source_name", "file").iter_rows())
    assert rows == {
        ("train", "lung", "a.h5ad"),
        ("train", "lung", "b.h5ad"),
        ("train", "blood", "x.h5ad"),
        ("val", "lung", "c.h5ad"),
        ("val", "blood", "x.h5ad"),
    }
    assert all(Path(p).is_file() for p in manifest["path"].to_list())


def test_split_naming_a_missing_file_fails(tmp_path):
    (tmp_path / "data" / "lung" / "h5ads").mkdir(parents=True)
    path = write_split(
        tmp_path,
        "s",
        {
            "source_name": "lung",
            "species": "hsapiens",
            "source_path": "${PATH.PROJECT_PATH}/data/${.source_name}/h5ads",
            "train": ["gone.h5ad"],
        },
    )
    split = splits.load_split_file(path, str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"split file .*s.yaml: train lists 'gone.h5ad', which does not exist"
    ):
        splits.expand({"train": ["s"]}, {"s": split})


def test_split_errors_name_the_file(tmp_path):
    path = write_split(
        tmp_path,
        "s",
        {"source_name": "lung", "species": "hsapiens", "source_path": "${PATH.NOPE}/x"},
    )
    with pytest.raises(ConfigError, match=r"s.yaml: cannot resolve interpolation"):
        splits.load_split_file(path, str(tmp_path))
    split = splits.resolve_split(
        "s", {"source_name": "lung", "species": "mmusculus", "source_path": "/x"}, "/p"
    )
    with pytest.raises(
        ConfigError, match="species 'mmusculus' but the dataset sheet says 'hsapiens'"
    ):
        splits.expand(
            {"train": ["s"]}, {"s": split}, datasets={"lung": "hsapiens"}, check_files=False
        )


def test_default_split_lists_every_file_for_training_and_round_trips(tmp_path):
    files = {f"d{i}": ("hsapiens", [f"f{j}.h5ad" for j in (2, 0, 1)]) for i in range(3)}
    files["m"] = ("mmusculus", ["only.h5ad"])
    first = splits.default_splits(files, project_path=str(tmp_path))
    assert first == splits.default_splits(dict(reversed(files.items())), project_path=str(tmp_path))
    assert first["d0"].files("train") == ["f0.h5ad", "f1.h5ad", "f2.h5ad"]
    assert all(s.files("val") == [] for s in first.values())  # validation is made of cells
    text = splits.split_yaml(first["d0"])
    written = write_split(tmp_path, "d0", yaml.safe_load(text))
    assert "${PATH.PROJECT_PATH}/data/${.source_name}/h5ads" in text
    assert splits.load_split_file(written, str(tmp_path)) == splits.SplitFile(
        **{**first["d0"].__dict__, "origin": str(written)}
    )


def test_holdout_cells_are_seeded_capped_and_by_name():
    names = {f"f{i}.h5ad": np.array([f"cell{i}_{j}" for j in range(2_000)]) for i in range(3)}
    held = splits.holdout_cells("ds", names, [], seed=1, val_fraction=0.1, max_cells_per_file=500)
    again = splits.holdout_cells(
        "ds", dict(reversed(names.items())), [], seed=1, val_fraction=0.1, max_cells_per_file=500
    )
    other = splits.holdout_cells("ds", names, [], seed=2, val_fraction=0.1, max_cells_per_file=500)
    for file, cells in names.items():
        assert np.array_equal(held[file], again[file])
        assert not np.array_equal(held[file], other[file])
        assert np.all(np.diff(held[file]) > 0)
        # Exactly the cells whose uniform is below the fraction: about 10%.
        u = splits.barcode_uniforms(1, "ds", cells)
        assert np.array_equal(held[file], np.flatnonzero(u < 0.1))
        assert 140 <= len(held[file]) <= 260
    # A cell's fate depends on its name only: the same cell in another order, same decision.
    shuffled = {"f0.h5ad": names["f0.h5ad"][::-1]}
    back = splits.holdout_cells(
        "ds", shuffled, [], seed=1, val_fraction=0.1, max_cells_per_file=500
    )
    assert set(shuffled["f0.h5ad"][back["f0.h5ad"]]) == set(names["f0.h5ad"][held["f0.h5ad"]])
    # The cap keeps the smallest uniforms.
    capped = splits.holdout_cells("ds", names, [], seed=1, val_fraction=0.1, max_cells_per_file=20)
    u = splits.barcode_uniforms(1, "ds", names["f1.h5ad"])
    assert np.array_equal(capped["f1.h5ad"], np.sort(np.argsort(u)[:20]))
    # Another dataset draws other cells from the same names.
    elsewhere = splits.holdout_cells(
        "other", names, [], seed=1, val_fraction=0.1, max_cells_per_file=500
    )
    assert not np.array_equal(elsewhere["f0.h5ad"], held["f0.h5ad"])


def test_holdout_of_files_sharing_barcodes_is_decided_together():
    rng = np.random.default_rng(0)
    cells = np.array([f"AAAC{i:05d}-1" for i in range(3_000)])
    files = {
        "filtered.h5ad": cells[rng.permutation(1_000)],
        "raw.h5ad": cells[rng.permutation(3_000)],  # the same cells and more
        "other.h5ad": np.array([f"GGGT{i:05d}-1" for i in range(1_000)]),
    }
    held = splits.holdout_cells(
        "ds",
        files,
        [["filtered.h5ad", "raw.h5ad"]],
        seed=3,
        val_fraction=0.2,
        max_cells_per_file=100,
    )
    in_val = {f: set(files[f][held[f]]) for f in files}
    train = {f: set(files[f]) - in_val[f] for f in files}
    # No cell is in validation through one file and in training through the other.
    assert not in_val["filtered.h5ad"] & train["raw.h5ad"]
    assert not in_val["raw.h5ad"] & train["filtered.h5ad"]
    assert in_val["filtered.h5ad"] <= in_val["raw.h5ad"]
    assert len(in_val["raw.h5ad"]) == 200  # the group's cap: two files' worth
    assert len(in_val["other.h5ad"]) == 100


# --- config -----------------------------------------------------------------------------


def test_config_defaults_and_errors_name_the_key():
    config = validate_config({}, SCHEMAS / "config.schema.yaml")
    assert config["preprocess"]["min_genes"] == 200
    assert config["shards"]["n_bins"] == 51
    with pytest.raises(
        ConfigError,
        match=r"config: preprocess.max_mito_fraction: 2 is greater than the maximum of 1",
    ):
        validate_config({"preprocess": {"max_mito_fraction": 2}}, SCHEMAS / "config.schema.yaml")
    with pytest.raises(
        ConfigError,
        match=r"config: \(top level\): Additional properties are not allowed \('shard' was unexpected\)",
    ):
        validate_config({"shard": {}}, SCHEMAS / "config.schema.yaml")


def test_dataset_sheet_validation(tmp_path):
    sheet = tmp_path / "datasets.tsv"
    sheet.write_text(
        "dataset\tspecies\tpath\tmin_genes\nlung\thsapiens\t/x.h5ad\t\nblood\tmmusculus\t/y.h5ad\t50\n"
    )
    frame = read_dataset_sheet(sheet, SCHEMAS / "datasets.schema.yaml")
    config = validate_config({}, SCHEMAS / "config.schema.yaml")
    assert dataset_settings(config, frame.loc["lung"].to_dict())["min_genes"] == 200
    assert dataset_settings(config, frame.loc["blood"].to_dict())["min_genes"] == 50

    sheet.write_text("dataset\tspecies\tpath\nlung; rm -rf ~\thsapiens\t/x.h5ad\n")
    with pytest.raises(
        ConfigError, match=r"line 2: dataset name 'lung; rm -rf ~' is not a safe identifier"
    ):
        read_dataset_sheet(sheet, SCHEMAS / "datasets.schema.yaml")
    sheet.write_text("dataset\tspecies\tpath\nlung\tHuman\t/x.h5ad\n")
    with pytest.raises(
        ConfigError, match=r"line 2 \(dataset 'lung'\): species: 'Human' does not match"
    ):
        read_dataset_sheet(sheet, SCHEMAS / "datasets.schema.yaml")
    sheet.write_text("dataset\tspecies\tpath\nlung\thsapiens\t/x\nlung\thsapiens\t/y\n")
    with pytest.raises(ConfigError, match="listed twice: lung"):
        read_dataset_sheet(sheet, SCHEMAS / "datasets.schema.yaml")
    sheet.write_text("dataset\tspecies\tpath\tmin_genes\nlung\thsapiens\t/x\tmany\n")
    with pytest.raises(ConfigError, match="line 2: min_genes: 'many' is not a number"):
        read_dataset_sheet(sheet, SCHEMAS / "datasets.schema.yaml")
