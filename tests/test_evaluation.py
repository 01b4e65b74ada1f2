"""Evaluation of cell embeddings: scIB metrics, bounded seeded reads, the callback in training
(metrics in metrics.csv, a trained model beating its random initialisation, two gloo ranks)."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from cellfoundry.config import section_defaults
from cellfoundry.errors import ConfigError
from cellfoundry.metrics import (
    embedding_metrics,
    graph_connectivity,
    ilisi,
    knn_accuracy,
    lisi,
    neighbors,
    silhouette_batch,
    silhouette_label,
)
from cellfoundry.train.evaluation import FILE, resolve, sample_cells
from test_families import family_inputs
from test_train import settings


def clusters(n_per: int, n_labels: int, *, separation: float, seed: int = 0):
    """Gaussian clusters: (X [n, 8], labels), label i centred at separation x e_i."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_labels), n_per)
    X = rng.normal(size=(len(labels), 8))
    X[np.arange(len(labels)), labels] += separation
    return X, labels.astype(str)


def test_label_metrics_tell_separated_from_mixed_labels():
    X, labels = clusters(40, 4, separation=12.0)
    shuffled = np.random.default_rng(1).permutation(labels)
    assert knn_accuracy(X, labels) == 1.0
    assert knn_accuracy(X, shuffled) < 0.45  # chance is 0.25
    assert silhouette_label(X, labels) > 0.85
    assert 0.4 < silhouette_label(X, shuffled) < 0.55  # silhouette near 0, rescaled to 0.5


def test_knn_accuracy_averages_repeated_folds():
    """Overlapping labels of 150 cells: one 5-fold split's accuracy moves with its seed; the
    mean over 10 repeated splits moves far less, around the same value."""
    X, labels = clusters(50, 3, separation=1.5)
    once = [knn_accuracy(X, labels, repeats=1, seed=s) for s in range(20)]
    repeated = [knn_accuracy(X, labels, seed=s) for s in range(20)]
    assert 0.4 < np.mean(repeated) < 0.95
    assert abs(np.mean(repeated) - np.mean(once)) < 0.02
    assert np.std(repeated) < 0.5 * np.std(once)
    assert knn_accuracy(X, labels, seed=3) == knn_accuracy(X, labels, seed=3)  # seeded


def test_batch_metrics_tell_mixed_from_separated_batches():
    X, labels = clusters(60, 3, separation=12.0)
    rng = np.random.default_rng(2)
    mixed = rng.integers(0, 2, len(labels)).astype(str)
    apart = X.copy()
    apart[:, 7] += 20.0 * (mixed == "1")  # the batches far apart within every label
    distances, indices = neighbors(X, 90)
    far_d, far_i = neighbors(apart, 90)
    assert ilisi(indices, distances, mixed) > 0.8  # each neighbourhood holds both batches
    assert ilisi(far_i, far_d, mixed) < 0.05
    assert silhouette_batch(X, labels, mixed) > 0.9
    assert silhouette_batch(apart, labels, mixed) < 0.5
    assert graph_connectivity(indices[:, :16], distances[:, :16], labels) > 0.97
    # Separated batches split each label's kNN graph into two components of about half.
    assert graph_connectivity(far_i[:, :16], far_d[:, :16], labels) < 0.7
    assert set(embedding_metrics(X, labels, mixed)) == {
        "knn_accuracy",
        "silhouette_label",
        "silhouette_batch",
        "graph_connectivity",
        "ilisi",
    }
    assert set(embedding_metrics(X, labels)) == {"knn_accuracy", "silhouette_label"}


def test_metrics_equal_scib_metrics():
    """Our transcriptions give scib-metrics' values (when it is installed: it needs jax)."""
    scib = pytest.importorskip("scib_metrics")
    from scib_metrics.nearest_neighbors import NeighborsResults

    X, labels = clusters(50, 4, separation=2.0, seed=3)
    batches = np.random.default_rng(4).integers(0, 3, len(labels)).astype(str)
    X[:, 6] += 0.8 * batches.astype(int)
    distances, indices = neighbors(X, 90)
    found = NeighborsResults(indices=indices, distances=distances)
    assert ilisi(indices, distances, batches) == pytest.approx(
        float(scib.ilisi_knn(found, batches)), abs=1e-5
    )
    np.testing.assert_allclose(
        lisi(indices, distances, batches), scib.lisi_knn(found, batches), rtol=1e-4
    )
    few = NeighborsResults(indices=indices[:, :16], distances=distances[:, :16])
    assert graph_connectivity(indices[:, :16], distances[:, :16], labels) == pytest.approx(
        float(scib.graph_connectivity(few, labels))
    )
    assert silhouette_batch(X, labels, batches) == pytest.approx(
        float(scib.silhouette_batch(X, labels, batches)), abs=1e-5
    )
    assert silhouette_label(X, labels) == pytest.approx(
        float(scib.silhouette_label(X, labels)), abs=1e-5
    )


def eval_settings(**changes) -> dict:
    return section_defaults("eval", {"every_n_steps": 5, "n_cells": 80, **changes})


def test_auto_finds_labelled_datasets_and_their_batches(tiny_corpus):
    sets = {s.name: s for s in resolve(eval_settings(), tiny_corpus["manifest"])}
    # demo_pbmc_10x has no labels; the brain's donors and the retina's two files are batches.
    assert sorted(sets) == ["demo_brain", "demo_pbmc_ids", "demo_retina"]
    assert (sets["demo_brain"].label_key, sets["demo_brain"].batch_key) == ("cell_type", "donor_id")
    assert (sets["demo_retina"].label_key, sets["demo_retina"].batch_key) == ("Cell_cluster", FILE)
    assert sets["demo_pbmc_ids"].batch_key is None
    assert [s.name for s in resolve(eval_settings(max_datasets=1), tiny_corpus["manifest"])] == [
        "demo_brain"
    ]


def test_bad_evaluation_datasets_fail_with_their_name(tiny_corpus, tmp_path):
    manifest = tiny_corpus["manifest"]
    with pytest.raises(ConfigError, match="dataset 'nope' is not in the shard manifest"):
        resolve(eval_settings(datasets=[{"dataset": "nope"}]), manifest)
    with pytest.raises(ConfigError, match="dataset 'demo_pbmc_10x' has no label column"):
        resolve(eval_settings(datasets=[{"dataset": "demo_pbmc_10x"}]), manifest)
    with pytest.raises(ConfigError, match="no obs column 'tissue' \\(batch_key\\)"):
        resolve(
            eval_settings(datasets=[{"dataset": "demo_pbmc_ids", "batch_key": "tissue"}]), manifest
        )
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(eval_settings(datasets=[{"file": str(tmp_path / "x.h5ad")}]), manifest)


def test_subsample_is_seeded_and_reads_the_right_rows(tiny_corpus):
    [retina] = resolve(
        eval_settings(datasets=[{"dataset": "demo_retina", "batch_key": "file"}]),
        tiny_corpus["manifest"],
    )
    cells = sample_cells(retina, 50, seed=0)
    assert cells.n_obs == 50 and sample_cells(retina, 50, seed=0).obs_names.equals(cells.obs_names)
    assert not sample_cells(retina, 50, seed=1).obs_names.equals(cells.obs_names)
    assert set(cells.obs["batch"]) == {"retina_batch1", "retina_batch2"}
    # The rows are those of the preprocessed files (read whole here, to compare).
    folder = tiny_corpus["project"] / "data" / "demo_retina" / "h5ads"
    for name in ("retina_batch1", "retina_batch2"):
        whole = ad.read_h5ad(folder / f"{name}.h5ad")
        mine = cells[cells.obs["batch"] == name]
        rows = [int(n.split(":")[1]) for n in mine.obs_names]
        expected = whole[rows]
        genes = mine.var_names.get_indexer(expected.var_names)
        assert (genes >= 0).all()
        np.testing.assert_array_equal(mine.X[:, genes].toarray(), expected.X.toarray())
        assert list(mine.obs["label"]) == list(expected.obs["Cell_cluster"].astype(str))
    # A held-out h5ad gives the same cells as the dataset's shards under the same name.
    [pbmc] = resolve(
        eval_settings(datasets=[{"dataset": "demo_pbmc_ids"}]), tiny_corpus["manifest"]
    )
    h5ad = tiny_corpus["project"] / "data" / "demo_pbmc_ids" / "h5ads" / "demo_pbmc_ids.h5ad"
    [held_out] = resolve(
        eval_settings(datasets=[{"file": str(h5ad), "name": "demo_pbmc_ids"}]),
        tiny_corpus["manifest"],
    )
    a, b = sample_cells(pbmc, 40, seed=0), sample_cells(held_out, 40, seed=0)
    assert held_out.species == "hsapiens" and held_out.label_key == "cell_type"
    assert (a.X != b.X).nnz == 0 and list(a.obs["label"]) == list(b.obs["label"])


def eval_metrics(run_dir) -> pl.DataFrame:
    metrics = pl.read_csv(run_dir / "logs" / "metrics.csv", infer_schema_length=None)
    return metrics.filter(pl.col("eval/seconds").is_not_null()).sort("step")


def test_metrics_are_logged_during_training_and_match_the_exported_model(tiny_corpus, tmp_path):
    from cellfoundry.inference import embed_cells
    from cellfoundry.metrics import embedding_metrics
    from cellfoundry.seeds import derive_seed
    from cellfoundry.train.run import train

    evaluation = eval_settings(datasets=[{"dataset": "demo_retina", "batch_key": "file"}])
    export = train(
        settings(max_steps=12), family_inputs(tiny_corpus), tmp_path / "run", seed=0,
        evaluation=evaluation,
    )  # fmt: skip
    rows = eval_metrics(tmp_path / "run")
    assert rows["step"].to_list() == [0, 5, 10, 12]  # first, every 5 steps, last
    for metric in (
        "knn_accuracy",
        "silhouette_label",
        "silhouette_batch",
        "graph_connectivity",
        "ilisi",
    ):
        model = rows[f"eval/demo_retina/{metric}"]
        baseline = rows[f"eval/demo_retina/{metric}_pca"]
        assert model.is_not_null().all() and ((model >= 0) & (model <= 1)).all(), metric
        assert baseline.n_unique() == 1  # computed once, logged with every evaluation
    assert rows["eval/demo_retina/knn_accuracy"].n_unique() > 1  # the model changed
    # The last evaluation is that of the exported model on the same cells.
    [retina] = resolve(evaluation, tiny_corpus["manifest"])
    cells = sample_cells(retina, evaluation["n_cells"], seed=0)
    z = embed_cells(export, cells, species="mmusculus")
    again = embedding_metrics(
        z, cells.obs["label"].to_numpy(), cells.obs["batch"].to_numpy(),
        seed=derive_seed(0, "eval", "demo_retina") % 2**32,
    )  # fmt: skip
    for metric, value in again.items():
        assert rows[f"eval/demo_retina/{metric}"][-1] == pytest.approx(value, abs=1e-3), metric


@pytest.mark.slow
def test_two_gloo_ranks_evaluate_on_rank_zero_and_train_as_one_process(tiny_corpus, tmp_path):
    """Evaluation on, two real DDP ranks (gloo, CPU): rank 0 evaluates while rank 1 waits,
    the ranks stay in step, and the weights equal those of one process without evaluation."""
    base = settings(max_steps=6, val_every_n_steps=100, **{"optimizer.warmup_steps": 1})
    command = [
        sys.executable, "-m", "cellfoundry", "train", "--seed", "3", "--accelerator", "cpu",
        "--manifest", str(tiny_corpus["manifest"]),
        "--token-mappings", *map(str, tiny_corpus["token_mappings"].values()),
        "--summaries", *map(str, tiny_corpus["summaries"].values()),
    ]  # fmt: skip
    single = subprocess.run(
        [*command, "--settings", json.dumps(base), "--devices", "1", "--run-dir", str(tmp_path / "one")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    evaluation = eval_settings(every_n_steps=2, n_cells=60)
    double = subprocess.run(
        [*command, "--settings", json.dumps({**base, "batch_size": base["batch_size"] // 2}),
         "--devices", "2", "--run-dir", str(tmp_path / "two"), "--eval", json.dumps(evaluation)],
        capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    assert double.returncode == 0, double.stderr[-3000:]
    assert "rank 1 of world size 2" in double.stderr
    rows = eval_metrics(tmp_path / "two")
    assert rows["step"].to_list() == [0, 2, 4, 6]
    for name in ("demo_brain", "demo_pbmc_ids", "demo_retina"):
        assert rows[f"eval/{name}/knn_accuracy"].is_not_null().all()
        assert rows[f"eval/{name}/knn_accuracy_pca"].is_not_null().all()
    assert double.stderr.count("step 6: eval demo_retina") == 1  # rank 0 alone evaluated
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5)


def test_contrastive_training_beats_random_initialisation(tiny_corpus, tmp_path):
    """A toy corpus whose labels separate (demo cell types): after training, kNN label accuracy
    of the model's cell embeddings is higher than that of its random initialisation (step 0)."""
    from cellfoundry.train.run import train

    values = settings(
        objective="contrastive", max_steps=80, batch_size=32, **{"optimizer.lr": 0.001}
    )
    evaluation = eval_settings(every_n_steps=80, n_cells=120)
    train(values, family_inputs(tiny_corpus), tmp_path / "run", seed=0, evaluation=evaluation)
    rows = eval_metrics(tmp_path / "run")
    assert rows["step"].to_list() == [0, 80]
    columns = [c for c in rows.columns if c.endswith("/knn_accuracy")]
    first, last = (np.mean([rows[c][i] for c in columns]) for i in (0, -1))
    assert last > first + 0.05, (first, last)
