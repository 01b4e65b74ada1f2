"""The SIMULATED demo corpus: layouts as real readers see them, determinism, learnable structure."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from cellfoundry import demo
from cellfoundry.demo import (
    DEMO_DATASETS,
    MIN_CELLS,
    RETINA_FILES,
    demo_dataset_sheet,
    write_demo_corpus,
)
from cellfoundry.io import sha256
from cellfoundry.reference import ENSEMBL_ID, bundled_species, load_bundled, symbol_index

# Cell Ranger's gene names are not unique, so reading the 10x file warns, as it does on real ones.
pytestmark = pytest.mark.filterwarnings("ignore:Variable names are not unique:UserWarning")

MITO_PREFIX = {"hsapiens": "MT-", "mmusculus": "mt-"}
# Usual QC thresholds; every healthy demo cell passes them all, every failing one does not.
MIN_COUNTS, MIN_GENES, MAX_MITO = 500, 200, 0.2


@dataclass(frozen=True)
class Part:
    """One file of a dataset, read the way a real reader reads it."""

    counts: np.ndarray  # cells x genes, raw counts
    symbols: np.ndarray  # gene symbols as the file has them (made unique where it did)
    gene_ids: np.ndarray | None  # Ensembl IDs where the file has them
    labels: np.ndarray | None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], float]:
    out = tmp_path_factory.mktemp("demo")
    written = write_demo_corpus(out)
    return out, written, time.monotonic()


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[set[str], dict[str, str]]]:
    return {
        species: (set(ref.table["gene_id"].to_list()), symbol_index(ref))
        for species in bundled_species()
        for ref in [load_bundled(species)]
    }


@pytest.fixture(scope="module")
def parts(corpus: tuple[Path, list[Path], float]) -> dict[str, list[Part]]:
    out, _, _ = corpus
    return {d.name: _read(d.name, out / d.path) for d in DEMO_DATASETS}


def _read(name: str, path: Path) -> list[Part]:
    if name == "demo_pbmc_ids":
        a = ad.read_h5ad(path)
        return [
            Part(a.X.toarray(), a.var["gene_name"].to_numpy(), a.var_names.to_numpy(), _labels(a))
        ]
    if name == "demo_pbmc_symbols":
        a = ad.read_h5ad(path)
        return [Part(a.layers["counts"], a.var_names.to_numpy(), None, _labels(a))]
    if name == "demo_brain":
        a = ad.read_h5ad(path)
        return [
            Part(
                a.raw.X.toarray(),
                a.var["feature_name"].to_numpy(),
                a.var_names.to_numpy(),
                _labels(a),
            )
        ]
    if name == "demo_pbmc_10x":
        import scanpy as sc

        a = sc.read_10x_h5(path, gex_only=True)
        return [Part(a.X.toarray(), a.var_names.to_numpy(), a.var["gene_ids"].to_numpy(), None)]
    if name == "demo_retina":
        result = []
        for file in sorted(path.iterdir()):
            with h5py.File(file, "r") as f:
                result.append(
                    Part(
                        f["matrix"][:].T,
                        f["row_attrs/Gene"][:].astype(str),
                        None,
                        f["col_attrs/Cell_cluster"][:].astype(str),
                    )
                )
        return result
    raise AssertionError(f"no reader for {name}")


def _labels(a: ad.AnnData) -> np.ndarray:
    return a.obs["cell_type"].astype(str).to_numpy()


def _qc(part: Part, species: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    totals = part.counts.sum(axis=1)
    genes = (part.counts > 0).sum(axis=1)
    mito = np.char.startswith(part.symbols.astype(str), MITO_PREFIX[species])
    return totals, genes, part.counts[:, mito].sum(axis=1) / np.maximum(totals, 1)


def _healthy(part: Part, species: str) -> np.ndarray:
    totals, genes, mito = _qc(part, species)
    return (totals >= MIN_COUNTS) & (genes >= MIN_GENES) & (mito <= MAX_MITO)


def _log_normalize(counts: np.ndarray) -> np.ndarray:
    return np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _is_integer(values: np.ndarray) -> bool:
    return bool(np.all(values == np.round(values)))


# ---------------------------------------------------------------------------------------------


def test_datasets_and_sheet() -> None:
    names = [d.name for d in DEMO_DATASETS]
    assert len(names) == len(set(names)) >= 4
    assert {d.species for d in DEMO_DATASETS} == {"hsapiens", "mmusculus"}
    assert all(400 <= d.n_cells <= 800 for d in DEMO_DATASETS)
    assert all("SIMULATED" in d.description for d in DEMO_DATASETS)
    sheet = demo_dataset_sheet(Path("resources/demo"))
    assert sheet.columns == ["dataset", "species", "path"]
    assert sheet["dataset"].to_list() == names
    assert (
        sheet.filter(sheet["dataset"] == "demo_retina")["path"].item()
        == "resources/demo/demo_retina"
    )
    assert "SIMULATED" in (demo.__doc__ or "")


def test_write_returns_paths(corpus: tuple[Path, list[Path], float]) -> None:
    out, written, _ = corpus
    assert written == [out / d.path for d in DEMO_DATASETS]
    assert all(p.exists() for p in written)
    assert sorted(p.name for p in (out / "demo_retina").iterdir()) == sorted(RETINA_FILES)
    # Nothing but the datasets: no temporaries left beside them.
    assert sorted(p.name for p in out.iterdir()) == sorted(d.path for d in DEMO_DATASETS)


def test_same_seed_same_bytes(corpus: tuple[Path, list[Path], float], tmp_path: Path) -> None:
    out, _, written_at = corpus
    # HDF5 can stamp objects with times in seconds; a second apart shows whether it does.
    time.sleep(max(0.0, 1.1 - (time.monotonic() - written_at)))
    write_demo_corpus(tmp_path)
    first, second = _tree_hashes(out), _tree_hashes(tmp_path)
    assert len(first) == len(DEMO_DATASETS) + len(RETINA_FILES) - 1
    assert first == second


def test_other_seed_other_data(tmp_path: Path) -> None:
    write_demo_corpus(tmp_path / "a", seed=0, n_cells=MIN_CELLS)
    write_demo_corpus(tmp_path / "b", seed=1, n_cells=MIN_CELLS)
    hashes_a, hashes_b = _tree_hashes(tmp_path / "a"), _tree_hashes(tmp_path / "b")
    assert hashes_a.keys() == hashes_b.keys()
    assert all(hashes_a[k] != hashes_b[k] for k in hashes_a)
    a = ad.read_h5ad(tmp_path / "a" / "demo_pbmc_ids.h5ad")
    b = ad.read_h5ad(tmp_path / "b" / "demo_pbmc_ids.h5ad")
    assert a.n_obs == b.n_obs == MIN_CELLS
    assert set(a.var_names) != set(b.var_names)  # the gene draw follows the seed too


def test_n_cells(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_cells"):
        write_demo_corpus(tmp_path, n_cells=MIN_CELLS - 1)
    write_demo_corpus(tmp_path, n_cells=51)
    for name in ("demo_pbmc_ids.h5ad", "demo_pbmc_symbols.h5ad", "demo_brain.h5ad"):
        assert ad.read_h5ad(tmp_path / name).n_obs == 51
    cells = 0
    for file in RETINA_FILES:
        with h5py.File(tmp_path / "demo_retina" / file) as f:
            cells += f["matrix"].shape[1]
    assert cells == 51


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path, *args: object) -> None:
        path.mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setitem(demo._WRITERS, "demo_retina", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_demo_corpus(tmp_path, n_cells=MIN_CELLS)
    assert list(tmp_path.iterdir()) == []


def test_pbmc_ids_layout(corpus: tuple[Path, list[Path], float], references) -> None:
    out, _, _ = corpus
    a = ad.read_h5ad(out / "demo_pbmc_ids.h5ad")
    assert isinstance(a.X, sp.csr_matrix)
    assert a.X.dtype == np.int32
    assert a.X.data.min() >= 0
    assert a.var_names.is_unique
    assert set(a.var_names) <= references["hsapiens"][0]
    ref = load_bundled("hsapiens").table
    names = dict(zip(ref["gene_id"].to_list(), ref["gene_name"].to_list(), strict=True))
    assert [names[g] for g in a.var_names] == a.var["gene_name"].tolist()
    assert a.obs["cell_type"].dtype == "category"
    assert a.obs_names.is_unique
    assert sum(n.startswith("MT-") for n in a.var["gene_name"]) == 37


def test_pbmc_symbols_layout(corpus: tuple[Path, list[Path], float], references) -> None:
    out, _, _ = corpus
    a = ad.read_h5ad(out / "demo_pbmc_symbols.h5ad")
    assert isinstance(a.X, np.ndarray)
    assert a.X.dtype == np.float32
    assert not _is_integer(a.X)
    counts = a.layers["counts"]
    assert isinstance(counts, np.ndarray)
    assert counts.min() >= 0
    assert _is_integer(counts)
    np.testing.assert_allclose(a.X, _log_normalize(counts.astype(np.float64)), rtol=1e-5, atol=1e-5)
    # Symbols only, made unique the anndata way, raw symbols (with duplicates) kept in var.
    assert not any(ENSEMBL_ID.match(g) for g in a.var_names)
    assert a.var_names.is_unique
    assert a.var["gene_symbols"].duplicated().sum() >= 1
    duplicated = a.var.loc[a.var["gene_symbols"].duplicated(), "gene_symbols"].iloc[0]
    assert f"{duplicated}-1" in a.var_names
    mapped = np.mean([s in references["hsapiens"][1] for s in a.var["gene_symbols"]])
    assert 0.9 < mapped < 0.995  # mostly mappable, a few retired symbols are not


def test_brain_layout(corpus: tuple[Path, list[Path], float], references) -> None:
    out, _, _ = corpus
    a = ad.read_h5ad(out / "demo_brain.h5ad")
    assert isinstance(a.X, sp.csr_matrix)
    assert not _is_integer(a.X.data)
    assert a.raw is not None
    assert isinstance(a.raw.X, sp.csr_matrix)
    assert a.raw.X.data.min() >= 0
    assert _is_integer(a.raw.X.data)
    assert list(a.raw.var_names) == list(a.var_names)
    assert set(a.var_names) <= references["mmusculus"][0]
    assert set(a.obs["organism_ontology_term_id"]) == {"NCBITaxon:10090"}
    assert a.obs["cell_type"].nunique() >= 5


def test_retina_loom_layout(corpus: tuple[Path, list[Path], float], references) -> None:
    out, _, _ = corpus
    genes = []
    for file in RETINA_FILES:
        with h5py.File(out / "demo_retina" / file, "r") as f:
            matrix = f["matrix"]
            assert matrix.dtype == np.int64
            n_genes, n_cells = matrix.shape
            assert f["row_attrs/Gene"].shape == (n_genes,)
            assert f["row_attrs/Gene"].dtype.kind == "S"
            assert f["col_attrs/CellID"].shape == f["col_attrs/Cell_cluster"].shape == (n_cells,)
            assert len(set(f["col_attrs/CellID"][:])) == n_cells
            for group in ("layers", "row_graphs", "col_graphs"):
                assert isinstance(f[group], h5py.Group)
                assert len(f[group]) == 0
            assert matrix[:].min() >= 0
            genes.append(f["row_attrs/Gene"][:].astype(str))
    assert np.array_equal(genes[0], genes[1])  # batches of one pipeline share the gene list
    mapped = np.mean([g in references["mmusculus"][1] for g in genes[0]])
    assert 0.9 < mapped < 0.995


def test_10x_layout(corpus: tuple[Path, list[Path], float], references) -> None:
    import scanpy as sc

    path = corpus[0] / "demo_pbmc_10x.h5"
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        assert m["data"].dtype == np.int32
        assert m["indices"].dtype == m["indptr"].dtype == np.int64
        assert m["shape"].dtype == np.int32
        n_features, n_cells = m["shape"][:]
        # Compressed by cell: the feature-by-cell matrix stored column-wise.
        assert m["indptr"].shape == (n_cells + 1,)
        assert m["barcodes"].shape == (n_cells,)
        assert m["features/id"].shape == (n_features,)
        assert m["indices"][:].max() < n_features
        assert set(m["features/_all_tag_keys"][:]) == {b"genome", b"read", b"pattern", b"sequence"}
        feature_types = set(m["features/feature_type"][:])
    assert feature_types == {b"Gene Expression", b"Antibody Capture"}
    everything = sc.read_10x_h5(path, gex_only=False)
    gex = sc.read_10x_h5(path, gex_only=True)
    assert everything.n_vars - gex.n_vars >= 5
    assert set(gex.var["feature_types"]) == {"Gene Expression"}
    assert set(gex.var["gene_ids"]) <= references["hsapiens"][0]
    assert not gex.var_names.is_unique  # Cell Ranger's names are not unique
    assert all(b.endswith("-1") for b in gex.obs_names)


def test_counts_and_qc(parts: dict[str, list[Part]]) -> None:
    for dataset in DEMO_DATASETS:
        for part in parts[dataset.name]:
            assert part.counts.min() >= 0
            assert _is_integer(part.counts)
            mito = np.char.startswith(part.symbols.astype(str), MITO_PREFIX[dataset.species])
            assert mito.sum() == 37
            totals, genes, mito_fraction = _qc(part, dataset.species)
            healthy = _healthy(part, dataset.species)
            # About 2% of cells fail, of all three kinds; the rest pass comfortably.
            assert 3 <= (~healthy).sum() <= 0.05 * healthy.size, dataset.name
            assert (totals < MIN_COUNTS).any(), dataset.name
            assert ((genes < MIN_GENES) & (totals >= MIN_COUNTS)).any(), dataset.name
            assert ((mito_fraction > MAX_MITO) & (totals >= MIN_COUNTS)).any(), dataset.name
            assert np.median(mito_fraction[healthy]) < 0.08
            # Droplet-like sparsity.
            assert 0.5 < np.mean(part.counts == 0) < 0.9


def test_ids_exist_and_species_pool_overlaps(parts: dict[str, list[Part]], references) -> None:
    human = [set(parts[n][0].gene_ids) for n in ("demo_pbmc_ids", "demo_pbmc_10x")]
    assert all(ids <= references["hsapiens"][0] for ids in human)
    shared = human[0] & human[1]
    assert 0.5 * len(human[0]) < len(shared) < len(human[0])  # partial overlap
    assert set(parts["demo_brain"][0].gene_ids) <= references["mmusculus"][0]


def test_cell_types_separable(parts: dict[str, list[Part]]) -> None:
    species = {d.name: d.species for d in DEMO_DATASETS}
    for name, dataset_parts in parts.items():
        for part in dataset_parts:
            if part.labels is None:
                continue
            keep = _healthy(part, species[name])
            x = _log_normalize(part.counts[keep].astype(np.float64))
            labels = part.labels[keep]
            # PCA of the most variable genes, as the usual scanpy recipe does.
            x = x[:, np.argsort(-x.var(axis=0), kind="stable")[:300]]
            x -= x.mean(axis=0)
            _, vectors = np.linalg.eigh(x.T @ x)  # small genes x genes problem: fast everywhere
            pcs = x @ vectors[:, -20:]
            distances = (pcs**2).sum(1)[:, None] + (pcs**2).sum(1)[None, :] - 2 * pcs @ pcs.T
            np.fill_diagonal(distances, np.inf)
            accuracy = np.mean(labels[distances.argmin(axis=1)] == labels)
            _, sizes = np.unique(labels, return_counts=True)
            assert accuracy > 0.9, name
            assert accuracy > sizes.max() / sizes.sum() + 0.4, name


def test_programs_shared_between_datasets(parts: dict[str, list[Part]], references) -> None:
    """Cell-type centroids of one PBMC dataset classify the cells of another one."""
    train, test = parts["demo_pbmc_ids"][0], parts["demo_pbmc_symbols"][0]
    index = references["hsapiens"][1]
    test_ids = np.array([index.get(s, "") for s in test.symbols])
    shared = sorted((set(train.gene_ids) & set(test_ids)) - {""})
    columns_train = [list(train.gene_ids).index(g) for g in shared]
    columns_test = [list(test_ids).index(g) for g in shared]
    keep_train, keep_test = _healthy(train, "hsapiens"), _healthy(test, "hsapiens")
    x_train = _log_normalize(train.counts[keep_train].astype(np.float64))[:, columns_train]
    x_test = _log_normalize(test.counts[keep_test].astype(np.float64))[:, columns_test]
    types = np.unique(train.labels)
    centroids = np.stack([x_train[train.labels[keep_train] == t].mean(axis=0) for t in types])
    predicted = types[np.argmin(((x_test[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)]
    assert np.mean(predicted == test.labels[keep_test]) > 0.8
