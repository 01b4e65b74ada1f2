"""Stage 2: reading, counts detection and validation, gene mapping, QC and the bad-input cases."""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import astuple
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import polars as pl
import pytest
import scanpy as sc
import scipy.sparse as sp

from cellfoundry.cli import main
from cellfoundry.errors import DatasetError
from cellfoundry.preprocess import (
    DatasetOutputs,
    PreprocessSettings,
    _collapse,
    aggregate_dataset,
    find_counts,
    map_columns,
)
from cellfoundry.readers import open_source
from cellfoundry.sources import SourceFile, dataset_sources
from prep import LOOSE, file_outputs, output_bytes, preprocess_dataset, preprocess_path


def h5ad_source(path: Path) -> SourceFile:
    return SourceFile(path.stem, path, "h5ad")


def nothing_written(root: Path) -> bool:
    """No output and no staged partial file anywhere under root."""
    return not [p for p in root.rglob("*") if p.is_file()]


# --- counts: where they are and whether they are counts ----------------------------------


def test_counts_found_in_layer_raw_or_x(make_adata, tmp_path):
    adata = make_adata()
    counts = adata.X.copy()
    adata.layers["counts"] = counts
    adata.X = sp.csr_matrix(np.log1p(counts.toarray()))
    path = tmp_path / "f.h5ad"
    adata.write_h5ad(path)
    with open_source("ds", h5ad_source(path)) as reader:
        assert find_counts(reader, "auto", "ds", path, 7) == "layers/counts"
        with pytest.raises(DatasetError, match=r"no raw counts: X holds non-integer values"):
            find_counts(reader, "X", "ds", path, 7)
        with pytest.raises(DatasetError, match=r"has no raw.X \(config preprocess.counts\)"):
            find_counts(reader, "raw.X", "ds", path, 7)

    del adata.layers["counts"]
    raw = adata.copy()
    raw.X = counts
    adata.raw = raw
    adata.write_h5ad(path)
    with open_source("ds", h5ad_source(path)) as reader:
        assert find_counts(reader, "auto", "ds", path, 7) == "raw.X"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "NaN values"),
        (-3.0, "negative values"),
        (np.inf, "infinite values"),
        (2.5, "non-integer values such as 2.5"),
    ],
)
@pytest.mark.parametrize("cell", [4, 55])  # in the first block, or found in a late one
def test_bad_counts_name_dataset_file_and_problem(
    make_adata, human, tmp_path, value, message, cell
):
    adata = make_adata()
    X = adata.X.toarray()
    X[cell, 7] = value
    adata.X = sp.csr_matrix(X)
    path = tmp_path / "in" / "pbmc.h5ad"
    path.parent.mkdir()
    adata.write_h5ad(path)
    with pytest.raises(DatasetError, match=message) as error:
        preprocess_path(path, human, tmp_path / "out", LOOSE, dataset="pbmc", block_cells=16)
    text = str(error.value)
    assert "\n" not in text
    prefix = "no raw counts: X holds " if cell < 16 else "X holds "
    assert text.startswith(f"dataset 'pbmc', file '{path}': {prefix}")
    assert f"first in cell 'cell{cell}', gene '{adata.var_names[7]}'" in text
    assert nothing_written(tmp_path / "out")


def test_near_integers_are_rounded_with_a_warning(make_adata, human, tmp_path, caplog):
    adata = make_adata()
    original = adata.X.copy()
    adata.X = adata.X.astype(np.float64)
    adata.X.data = adata.X.data + 4e-7
    path = tmp_path / "f.h5ad"
    adata.write_h5ad(path)
    with caplog.at_level(logging.WARNING):
        qc, out = preprocess_path(path, human, tmp_path / "out", block_cells=7)
    assert qc["values_rounded"] == original.nnz
    assert f"{original.nnz} values within 1e-06 of integers were rounded" in caplog.text
    written = ad.read_h5ad(out.h5ad)
    kept = original[adata.obs_names.get_indexer(written.obs_names)]
    assert (kept != written.X).nnz == 0


# --- genes --------------------------------------------------------------------------------


def test_map_ids_strips_versions_and_drops_unknown(human):
    ids = np.array(["ENSG00000141510.18", "ENSG00000000003", "ENSG99999999999", "ERCC-00002"])
    mapping = map_columns([("var_names", ids)], human)
    assert mapping.kind == "ensembl_id"
    assert list(mapping.gene_ids) == ["ENSG00000141510", "ENSG00000000003", None, None]
    assert mapping.matches == {"exact": 2, "unmapped": 2}


def test_map_symbols_resolves_made_unique_duplicates(human):
    symbols = np.array(["TP53", "TSPAN6", "TSPAN6-1", "NOT_A_GENE", "mt-co1"])
    mapping = map_columns([("var_names", symbols)], human)
    assert mapping.kind == "symbol"
    assert mapping.gene_ids[0] == "ENSG00000141510"
    assert mapping.gene_ids[1] == mapping.gene_ids[2] == "ENSG00000000003"
    assert mapping.gene_ids[3] is None
    assert mapping.gene_ids[4] == mapping_of(human, "MT-CO1")  # found ignoring case
    assert mapping.matches == {"case": 1, "exact": 3, "unknown": 1}


def mapping_of(reference, symbol: str) -> str:
    table = reference.table.filter(pl.col("gene_name") == symbol)
    return table["gene_id"][0]


@pytest.mark.parametrize("how", ["sum", "first"])
def test_duplicate_genes_are_summed_or_first(make_adata, human, tmp_path, how):
    adata = make_adata(n_cells=30, n_genes=50)
    ids = adata.var_names.to_numpy().copy()
    ids[1] = ids[0]  # two features for one gene ...
    ids[9] = ids[4]  # ... twice
    adata.var["gene_ids"] = ids
    adata.var_names = [f"feature{i}" for i in range(50)]
    path = tmp_path / "dup.h5ad"
    adata.write_h5ad(path)
    settings = PreprocessSettings(min_genes=1, min_counts=1, max_mito_fraction=1.0)
    settings = PreprocessSettings(**{**settings.__dict__, "duplicate_genes": how})
    qc, out = preprocess_path(path, human, tmp_path / how, settings, block_cells=7)
    written = ad.read_h5ad(out.h5ad)
    assert qc["duplicate_genes_merged"] == 2
    # Genes in order of their first feature; duplicates merged into it.
    assert list(written.var_names) == list(dict.fromkeys(ids))
    X = adata.X.toarray()[adata.obs_names.get_indexer(written.obs_names)]
    expected = X.copy()
    if how == "sum":
        expected[:, 0] += X[:, 1]
        expected[:, 4] += X[:, 9]
    expected = np.delete(expected, [1, 9], axis=1)
    assert np.array_equal(written.X.toarray(), expected)


def test_collapse_merges_any_duplicate_pattern_like_dense_sums():
    rng = np.random.default_rng(3)
    n_cells, n_features = 40, 60
    dense = rng.poisson(0.8, size=(n_cells, n_features)) * (rng.random((n_cells, n_features)) < 0.5)
    genes_of = rng.integers(-1, 15, size=n_features)  # -1: unmapped; many duplicates
    out_col = np.full(n_features, -1, dtype=np.int32)
    primary = np.zeros(n_features, dtype=bool)
    first: dict[int, int] = {}
    for i, g in enumerate(genes_of):
        if g < 0:
            continue
        if g not in first:
            first[g] = len(first)
            primary[i] = True
        out_col[i] = first[g]
    keep = rng.random(n_cells) < 0.8
    X = sp.csr_matrix(dense)
    indptr, genes, values = _collapse(
        X.indptr.astype(np.int64),
        X.indices.astype(np.int64),
        X.data.astype(np.int64),
        keep,
        out_col,
        primary,
    )
    expected = np.zeros((n_cells, len(first)), dtype=np.int64)
    for i in np.flatnonzero(out_col >= 0):
        expected[:, out_col[i]] += dense[:, i]
    got = sp.csr_matrix((values, genes, indptr), shape=(int(keep.sum()), len(first)))
    for row in range(got.shape[0]):
        assert np.all(np.diff(got.indices[got.indptr[row] : got.indptr[row + 1]]) > 0)
    assert np.array_equal(got.toarray(), expected[keep])
    assert np.all(values > 0)


# --- one file, its outputs ----------------------------------------------------------------


def test_preprocess_file_filters_cells_and_keeps_counts(make_adata, human, tmp_path):
    adata = make_adata(n_cells=80, n_genes=300)
    X = adata.X.toarray()
    X[0] = 0
    X[0, :5] = 1  # 5 genes, 5 counts: fails min_genes and min_counts
    X[1, -1] = X[1].sum() * 3  # mitochondrial gene dominates: fails max_mito_fraction
    adata.X = sp.csr_matrix(X)
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    qc, out = preprocess_path(path, human, tmp_path / "out", block_cells=16, n_bins=11)
    written = ad.read_h5ad(out.h5ad)
    assert qc["cells_in"] == 80
    assert qc["cells_kept"] == 78 == written.n_obs
    assert qc["cells_failed"] == {"min_genes": 1, "min_counts": 1, "max_mito_fraction": 1}
    assert qc["mito_genes"] == 1
    assert "cell0" not in written.obs_names and "cell1" not in written.obs_names
    assert written.X.dtype == np.int32
    assert list(written.var_names) == list(adata.var_names)  # all map, in file order
    assert {"gene_name", "gene_type"} <= set(written.var.columns)
    assert {"total_counts", "n_genes_by_counts", "mito_fraction", "cell_type"} <= set(
        written.obs.columns
    )
    assert written.uns["cellfoundry"]["counts_source"] == "X"
    kept = adata[written.obs_names]
    assert np.array_equal(written.X.toarray(), kept.X.toarray())
    assert np.array_equal(written.obs["total_counts"], np.asarray(kept.X.sum(1)).ravel())
    assert list(written.obs["cell_type"]) == list(kept.obs["cell_type"])
    # The shard holds the same matrix, packed, with the totals.
    indptr = np.load(out.shard / "indptr.npy")
    entries = np.load(out.shard / "entries.npy")
    assert np.array_equal(indptr, written.X.indptr)
    assert np.array_equal(entries["gene"], written.X.indices)
    assert np.array_equal(entries["count"], written.X.data)
    assert np.array_equal(np.load(out.shard / "total_counts.npy"), written.obs["total_counts"])
    shard = json.loads((out.shard / "shard.json").read_text())
    assert (shard["n_cells"], shard["nnz"], shard["file"]) == (78, written.X.nnz, "in.h5ad")
    # Every cell's metrics, kept or not, for the QC figure.
    cells = pl.read_parquet(out.cells)
    assert cells.height == 80 and cells["kept"].sum() == 78
    assert cells.filter(~pl.col("kept"))["obs_name"].to_list() == ["cell0", "cell1"]


def test_dataset_outputs_written_and_deterministic(make_adata, human, tmp_path):
    adata = make_adata()
    folder = tmp_path / "in"
    folder.mkdir()
    adata[:30].copy().write_h5ad(folder / "a.h5ad")
    adata[30:].copy().write_h5ad(folder / "b.h5ad")
    digests = []
    for run in ("one", "two"):
        qc, files, out = preprocess_dataset(folder, human, tmp_path / run)
        assert [f["file"] for f in qc["files"]] == ["a", "b"]
        assert [f["output"] for f in qc["files"]] == ["a.h5ad", "b.h5ad"]
        assert qc["cells_in"] == 60 and qc["shared_barcodes"] == []
        assert json.loads(out.qc.read_text()) == qc
        provenance = json.loads(out.provenance.read_text())
        assert [Path(i["file"]).name for i in provenance["inputs"]] == ["a.h5ad", "b.h5ad"]
        assert all(len(i["blake3"]) == 64 for i in provenance["inputs"])
        assert provenance["versions"]["anndata"] == version("anndata")
        manifest = json.loads(out.shard_manifest.read_text())
        assert [(s["file"], s["n_cells"]) for s in manifest["shards"]] == [
            ("a.h5ad", qc["files"][0]["cells_kept"]),
            ("b.h5ad", qc["files"][1]["cells_kept"]),
        ]
        digests.append(
            [output_bytes(f) for f in files] + [out.gene_stats.read_bytes(), out.qc.read_bytes()]
        )
    assert digests[0] == digests[1]


def test_no_mitochondrial_gene_is_a_warning_in_log_qc_and_figure(
    make_adata, human, tmp_path, caplog, monkeypatch
):
    """Without MT- genes mito_fraction is 0 for every cell and max_mito_fraction filters
    nothing: the file's log, its QC record and the dataset's QC figure say so; a file with a
    mitochondrial gene gets no such warning."""
    import matplotlib.figure
    import matplotlib.text

    drawn: list[str] = []
    savefig = matplotlib.figure.Figure.savefig

    def recording_savefig(figure, *args, **kwargs):
        drawn.extend(t.get_text() for t in figure.findobj(matplotlib.text.Text))
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    adata = make_adata()
    mito = adata.var["gene_name"].str.startswith("MT-").to_numpy()
    assert mito.sum() == 1
    adata.write_h5ad(tmp_path / "with_mito.h5ad")
    adata[:, ~mito].copy().write_h5ad(tmp_path / "no_mito.h5ad")
    seen = {}
    for name in ("with_mito", "no_mito"):
        caplog.clear()
        drawn.clear()
        with caplog.at_level(logging.WARNING, logger="cellfoundry"):
            qc, _, out = preprocess_dataset(
                tmp_path / f"{name}.h5ad", human, tmp_path / name, dataset=name
            )
        logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        seen[name] = (qc["files"][0]["warnings"], logged, list(drawn), out.qc_plot)
    assert seen["with_mito"][:2] == ([], [])
    assert not any("warning" in text or "no mito" in text for text in seen["with_mito"][2])
    warnings, logged, texts, figure = seen["no_mito"]
    assert len(warnings) == 1 and "no mitochondrial (MT-) gene" in warnings[0]
    assert logged == [f"no_mito: no_mito.h5ad: {warnings[0]}"]
    assert any(f"warning: {warnings[0]}" in text for text in texts)  # under the title
    assert "no mitochondrial genes" in texts  # on the mitochondrial-fraction panel
    assert figure.stat().st_size > 10_000


def test_aggregating_shards_of_different_bins_leaves_no_dataset_output(make_adata, human, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    adata = make_adata()
    adata[:30].copy().write_h5ad(folder / "a.h5ad")
    adata[30:].copy().write_h5ad(folder / "b.h5ad")
    root = tmp_path / "out"
    # b was preprocessed with another shards.n_bins (a stale output, say)
    files = [
        preprocess_path(folder / f"{name}.h5ad", human, root, n_bins=n_bins)[1]
        for name, n_bins in (("a", 11), ("b", 51))
    ]
    outputs = DatasetOutputs(
        root / "stats" / "datasets" / "ds.parquet",
        root / "qc" / "ds" / "qc.json",
        root / "qc" / "ds" / "qc.png",
        root / "provenance" / "ds.json",
        root / "shards" / "ds" / "manifest.json",
    )
    with pytest.raises(
        DatasetError, match=r"dataset 'ds', file '.*b': has 51 bins, other shards 11"
    ):
        aggregate_dataset(
            "ds",
            "hsapiens",
            folder,
            [f.qc for f in files],
            [f.gene_stats for f in files],
            [f.shard for f in files],
            LOOSE,
            outputs,
            reference_source=human.source,
        )
    for path in astuple(outputs):
        assert not path.exists(), path
    assert not list(root.rglob(".*partial*"))
    assert sorted(p.name for p in (root / "shards" / "ds").iterdir()) == ["a", "b"]


def test_failure_in_a_late_block_leaves_no_partial_output(make_adata, human, tmp_path):
    adata = make_adata(n_cells=100)
    X = adata.X.toarray().astype(np.float32)
    X[97, 3] = 0.5  # the last block
    adata.X = sp.csr_matrix(X)
    path = tmp_path / "b.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(DatasetError, match=r"dataset 'ds', file '.*b.h5ad': X holds non-integer"):
        preprocess_path(path, human, tmp_path / "out", block_cells=10)
    assert nothing_written(tmp_path / "out")


def test_a_full_disk_is_the_error_reported_and_leaves_no_partial_output(
    make_adata, human, tmp_path, monkeypatch
):
    """When the disk fills while X is written, closing the h5ad fails too (h5py flushes on
    close): the error raised is still the write's, and nothing is left behind."""
    from cellfoundry.preprocess import H5adWriter

    def full_disk(self):
        def close():
            raise RuntimeError("Can't close dataset (file write failed)")

        self.handle.close = close
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(H5adWriter, "_flush", full_disk)
    path = tmp_path / "b.h5ad"
    make_adata(n_cells=100).write_h5ad(path)
    with pytest.raises(OSError, match="No space left on device"):
        preprocess_path(path, human, tmp_path / "out", block_cells=10)
    assert nothing_written(tmp_path / "out")


def test_a_matrix_with_other_cells_than_obs_fails_in_one_line(make_adata, human, tmp_path):
    """obs is read after the counts have streamed, so its length is checked on opening."""
    path = tmp_path / "short.h5ad"
    make_adata(n_cells=100).write_h5ad(path)
    with h5py.File(path, "r+") as handle:
        dense = handle["X"]["data"][:0]  # any dtype the counts have
        del handle["X"]
        handle.create_dataset("X", data=np.ones((90, 300), dtype=dense.dtype))
        handle["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    with pytest.raises(DatasetError, match=r"file '.*short.h5ad'.*X has 90 rows but obs has 100"):
        preprocess_path(path, human, tmp_path / "out")
    assert nothing_written(tmp_path / "out")


def test_too_few_genes_mapping_fails_naming_the_likely_species(make_adata, mouse, tmp_path):
    path = tmp_path / "human.h5ad"
    make_adata().write_h5ad(path)
    with pytest.raises(
        DatasetError,
        match=r"only 0 of 300 genes \(0.0%\) map to the mmusculus reference.*; they look like "
        r"hsapiens genes \(300 of 300 IDs start with ENSG\)",
    ):
        preprocess_path(path, mouse, tmp_path / "out", species="mmusculus")
    assert nothing_written(tmp_path / "out")


def test_settings_naming_what_is_not_there_fail_in_one_line(make_adata, human, tmp_path):
    path = tmp_path / "f.h5ad"
    make_adata().write_h5ad(path)
    for override, message in (
        ({"counts": "layers/umi"}, "has no layers/umi (config preprocess.counts); the file has X"),
        ({"genes": "var/ensembl"}, "has no var column 'ensembl' (config preprocess.genes)"),
    ):
        settings = PreprocessSettings(**{**LOOSE.__dict__, **override})
        with pytest.raises(DatasetError) as error:
            preprocess_path(path, human, tmp_path / "out", settings)
        assert str(error.value) == f"dataset 'ds', file '{path}': {message}"
    assert nothing_written(tmp_path / "out")


def test_empty_after_qc_fails(make_adata, human, tmp_path):
    path = tmp_path / "shallow.h5ad"
    make_adata(depth=50).write_h5ad(path)
    with pytest.raises(
        DatasetError, match=r"no cell passes QC \(60 cells; min_genes=200 removes 60"
    ):
        preprocess_path(path, human, tmp_path / "out", PreprocessSettings())
    assert nothing_written(tmp_path / "out")


def cli_preprocess(dataset: str, species: str, path: Path, root: Path, reference: str) -> list[str]:
    (source,) = dataset_sources(dataset, path).files
    out = file_outputs(root, source.name, dataset)
    return [
        "preprocess",
        "--dataset",
        dataset,
        "--file",
        source.name,
        "--species",
        species,
        "--input",
        str(path),
        f"--reference={reference}",
        "--settings",
        json.dumps(LOOSE.__dict__),
        "--n-bins",
        "11",
        "--exact-max-cells",
        "100",
        "--block-cells",
        "7",
        *("--h5ad", str(out.h5ad), "--shard", str(out.shard), "--gene-stats", str(out.gene_stats)),
        *("--qc", str(out.qc), "--cells", str(out.cells)),
    ]


def test_cli_preprocesses_one_file_and_reports_bad_input_in_one_line(make_adata, tmp_path, capsys):
    path = tmp_path / "cow.h5ad"
    make_adata().write_h5ad(path)
    # A species without a reference: one line naming dataset, file and problem.
    assert main(cli_preprocess("cow", "btaurus", path, tmp_path / "out", "")) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        f"cellfoundry preprocess: error: dataset 'cow', file '{path}': species 'btaurus' has no "
        "gene reference"
    )
    assert nothing_written(tmp_path / "out")
    reference = tmp_path / "hsapiens.parquet"
    assert main(["reference", "--species", "hsapiens", "--out", str(reference)]) == 0
    assert main(cli_preprocess("pbmc", "hsapiens", path, tmp_path / "out", str(reference))) == 0
    out = file_outputs(tmp_path / "out", "cow", "pbmc")
    assert ad.read_h5ad(out.h5ad).n_obs == json.loads(out.qc.read_text())["cells_kept"] > 0


def test_truncated_and_unsupported_files(make_adata, human, tmp_path):
    path = tmp_path / "cut.h5ad"
    make_adata().write_h5ad(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DatasetError, match=r"dataset 'ds', file '.*cut.h5ad': cannot be read as h5ad"
    ):
        preprocess_path(path, human, tmp_path / "out")
    whole = gzip.compress(data)
    for name, content in (("cut", whole[: len(whole) // 2]), ("bad", whole[:20] + b"x" * 200)):
        gz = tmp_path / f"{name}.h5ad.gz"
        gz.write_bytes(content)  # truncated stream, corrupt stream
        with pytest.raises(DatasetError, match=rf"{name}.h5ad.gz': cannot be read as h5ad"):
            preprocess_path(gz, human, tmp_path / "out")
    junk = tmp_path / "molecule_info.h5"
    junk.write_bytes(b"not hdf5" * 100)
    with pytest.raises(DatasetError, match=r"molecule_info.h5': cannot be read as 10x HDF5"):
        preprocess_path(junk, human, tmp_path / "out")
    assert nothing_written(tmp_path / "out")
    text = tmp_path / "notes.csv"
    text.write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"notes.csv': unsupported format \(supported: .h5ad"):
        dataset_sources("ds", text)
    with pytest.raises(DatasetError, match="no such file or folder"):
        dataset_sources("ds", tmp_path / "missing.h5ad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty': folder holds no .h5ad.gz, .h5ad, .h5"):
        dataset_sources("ds", tmp_path / "empty")


def test_two_inputs_with_one_output_name_fail(make_adata, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    make_adata().write_h5ad(folder / "a b.h5ad")
    make_adata().write_h5ad(folder / "a_b.h5ad")
    with pytest.raises(DatasetError, match=r"gives the same output name 'a_b.h5ad' as"):
        dataset_sources("ds", folder)


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
        preprocess_path(path, human, tmp_path / "out")
    adata.obs["organism_ontology_term_id"] = "NCBITaxon:10090"
    adata.write_h5ad(path)
    with pytest.raises(DatasetError, match=r"organism is NCBITaxon:10090 but the dataset sheet"):
        preprocess_path(path, human, tmp_path / "out")


# --- the real datasets ----------------------------------------------------------------------


def read_whole(path: Path) -> ad.AnnData:
    """A real file read whole by the format's own library, gene-expression features only."""
    if path.suffix == ".h5":
        return sc.read_10x_h5(path)  # gex_only: antibody capture left out
    if path.suffix == ".loom":
        with h5py.File(path) as handle:
            X = sp.csr_matrix(handle["matrix"][()].T)
            genes = handle["row_attrs/Gene"][()].astype(str)
            cells = handle["col_attrs/Cell_id"][()].astype(str)
        return ad.AnnData(X=X, obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes))
    adata = ad.read_h5ad(path)
    return adata.raw.to_adata() if adata.raw is not None else adata


REAL = [
    # file, species, counts source, cells in the file, minimum mapping rate
    ("human_pbmc1k_10x_cellranger6.h5", "hsapiens", "X", 892, 0.95),
    ("human_pbmc5k_protein_v3_200cells.h5ad", "hsapiens", "X", 200, 0.83),
    ("mouse_e18_brain_10k_cells_1000genes.h5ad", "mmusculus", "X", 10_000, 0.95),
    ("mouse_sympathetic_furlan2016.loom", "mmusculus", "X", 298, 0.85),
    ("cellxgene_example_valid_2cells.h5ad", "hsapiens", "raw.X", 2, 0.99),
]


@pytest.mark.parametrize(("file", "species", "counts_source", "n_cells", "min_rate"), REAL)
def test_real_datasets(
    shared_data, human, mouse, tmp_path, file, species, counts_source, n_cells, min_rate
):
    reference = human if species == "hsapiens" else mouse
    # The defaults, except for files whose cells are smaller than real cells in every way.
    settings = PreprocessSettings()
    if file.startswith("mouse_e18"):  # 1,000 genes
        settings = PreprocessSettings(min_genes=20, min_counts=50)
    elif n_cells <= 2:  # 7 genes
        settings = PreprocessSettings(min_genes=1, min_counts=1)
    qc, out = preprocess_path(shared_data / file, reference, tmp_path, settings, species=species)
    assert qc["counts_source"] == counts_source
    assert qc["cells_in"] == n_cells
    assert qc["mapping_rate"] >= min_rate
    assert qc["mapped_counts_fraction"] >= qc["mapping_rate"] - 0.05
    written = ad.read_h5ad(out.h5ad)
    assert written.X.dtype == np.int32 and written.X.data.min() > 0
    assert written.var_names.str.startswith("ENS").all()
    assert written.n_vars == qc["genes_out"] == qc["genes_mapped"] - qc["duplicate_genes_merged"]
    # QC metrics over the gene-expression features, as the format's own reader gives them.
    whole = read_whole(shared_data / file)
    cells = pl.read_parquet(out.cells)
    assert qc["genes_counted"] == whole.n_vars
    assert np.array_equal(cells["total_counts"].to_numpy(), np.asarray(whole.X.sum(1)).ravel())
    assert np.array_equal(
        cells["n_genes_by_counts"].to_numpy(), np.asarray((whole.X > 0).sum(1)).ravel()
    )
    mito = np.asarray(whole.var_names.str.upper().str.startswith("MT-"))
    total = np.asarray(whole.X.sum(1)).ravel()
    fraction = np.asarray(whole.X[:, mito].sum(1)).ravel() / np.maximum(total, 1)
    keep = (
        (total >= settings.min_counts)
        & (np.asarray((whole.X > 0).sum(1)).ravel() >= settings.min_genes)
        & (fraction <= settings.max_mito_fraction)
    )
    assert qc["cells_kept"] == int(keep.sum())
    assert list(written.obs_names) == list(whole.obs_names[keep])
    if file.endswith(".h5"):  # the numbers: antibody capture is not counted
        assert qc["cells_kept"] == 827
        assert qc["features_left_out"] == {"Antibody Capture": 10}


def test_invalid_cellxgene_file_fails_clearly(shared_data, human, tmp_path):
    path = shared_data / "bad_cellxgene_example_invalid.h5ad"
    with pytest.raises(DatasetError, match="cells come from several organisms"):
        preprocess_path(path, human, tmp_path)
    assert nothing_written(tmp_path)
