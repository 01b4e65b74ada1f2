"""Cell embeddings of new files: genes given as symbols are mapped as preprocessing maps them;
a file whose genes do not map is refused with one line (issue 14, point 6)."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pytest

from cellfoundry.cli import main
from cellfoundry.inference import embed_cells
from cellfoundry.reference import read_reference, symbol_index
from cellfoundry.train.run import TrainInputs, train
from test_train import settings


@pytest.fixture(scope="module")
def exported(tiny_corpus, tmp_path_factory):
    project = tiny_corpus["project"]
    inputs = TrainInputs(
        tiny_corpus["manifest"],
        tiny_corpus["token_mappings"],
        tiny_corpus["summaries"],
        {},
        references={
            s: project / "references" / "genes" / f"{s}.parquet" for s in tiny_corpus["summaries"]
        },
    )
    return train(settings(max_steps=3), inputs, tmp_path_factory.mktemp("model") / "run", seed=0)


def pbmc(tiny_corpus) -> ad.AnnData:
    folder = tiny_corpus["project"] / "data" / "demo_pbmc_ids" / "h5ads"
    return ad.read_h5ad(next(folder.glob("*.h5ad")))


def test_symbols_are_mapped_like_preprocessing(tiny_corpus, exported, caplog):
    adata = pbmc(tiny_corpus)
    reference = read_reference(
        "hsapiens", tiny_corpus["project"] / "references" / "genes" / "hsapiens.parquet"
    )
    index = symbol_index(reference)
    # Genes whose symbol leads back to their own ID: both files then hold the same genes.
    same = [
        i
        for i, (gene, name) in enumerate(zip(adata.var_names, adata.var["gene_name"], strict=True))
        if index.get(name) == gene
    ]
    assert len(same) > 0.9 * adata.n_vars
    ids = adata[:, same].copy()
    symbols = ad.AnnData(X=ids.X.copy(), obs=ids.obs.copy())
    symbols.var_names = ids.var["gene_name"].astype(str).to_numpy()
    caplog.set_level(logging.INFO)
    by_id = embed_cells(exported, ids, species="hsapiens", batch_size=32)
    by_symbol = embed_cells(exported, symbols, species="hsapiens", batch_size=32, source="symbols")
    np.testing.assert_allclose(by_symbol, by_id, rtol=1e-5, atol=1e-6)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("symbols:"))
    assert f"{len(same)} of {len(same)} genes mapped to Ensembl IDs by symbol (var_names)" in line
    assert "in the model's vocabulary" in line


def test_a_file_whose_genes_do_not_map_is_refused(tiny_corpus, exported, tmp_path, capsys):
    adata = pbmc(tiny_corpus)
    unknown = ad.AnnData(X=adata.X, obs=adata.obs)
    unknown.var_names = [f"feature_{i}" for i in range(adata.n_vars)]
    unknown.uns["cellfoundry"] = {"species": "hsapiens"}
    path = tmp_path / "unknown.h5ad"
    unknown.write_h5ad(path)
    out = tmp_path / "embedded.h5ad"
    code = main(["embed-cells", "--model", str(exported), "--h5ad", str(path), "--out", str(out)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and not out.exists()
    assert error.startswith(f"cellfoundry embed-cells: error: {path}: only 0 of {adata.n_vars}")
