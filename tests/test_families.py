"""The model families: each objective trains, exports, embeds cells; Geneformer loads in
Hugging Face; SEDD samples cells; two real DDP processes match one process."""

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

from cellfoundry.config import ConfigError, validate_config
from cellfoundry.inference import embed_h5ad, sample_cells
from cellfoundry.train.data import BatchPlan, CellNoise, VocabularyLayout, open_split
from cellfoundry.train.presets import PRESETS
from cellfoundry.train.run import TrainInputs, build, train
from conftest import TINY_TRAIN
from test_train import inputs_of, mappings_of, settings


def family_inputs(corpus) -> TrainInputs:
    panels = {s: {"hvg": p} for s, p in corpus["panels"].items()}
    return TrainInputs(
        corpus["manifest"], corpus["token_mappings"], corpus["summaries"], {}, panels
    )


@pytest.mark.parametrize("objective", ["binned_mlm", "geneformer_mlm", "contrastive", "diffusion"])
def test_each_objective_trains_exports_and_embeds(tiny_corpus, tmp_path, objective):
    # Contrastive learning starts slowly (all cells look alike to a fresh encoder) and wants a
    # smaller learning rate: more steps.
    steps, lr = (60, 0.001) if objective == "contrastive" else (25, 0.003)
    values = settings(objective=objective, max_steps=steps, batch_size=16, **{"optimizer.lr": lr})
    export = train(values, family_inputs(tiny_corpus), tmp_path / objective, seed=0)
    metrics = pl.read_csv(tmp_path / objective / "logs" / "metrics.csv")
    # Every objective learns something. The contrastive task on four tiny datasets is learnt
    # on the training cells long before it carries over to the held-out dataset (whose
    # validation loss stays near chance for this many steps), so it is judged on training.
    stage = "train" if objective == "contrastive" else "val"
    curve = metrics.filter(pl.col(f"{stage}/loss").is_not_null()).sort("step")
    losses = curve[f"{stage}/loss"].to_list()
    window = 3 if stage == "train" else 1  # training losses are noisy: compare means
    assert np.mean(losses[-window:]) < np.mean(losses[:window]), losses

    h5ad = next((tiny_corpus["project"] / "data" / "demo_pbmc_ids" / "h5ads").glob("*.h5ad"))
    out = embed_h5ad(export, h5ad, tmp_path / "embedded.h5ad", batch_size=16)
    embedded = ad.read_h5ad(out)
    z = embedded.obsm["X_cellfoundry"]
    assert z.shape[0] == embedded.n_obs and np.isfinite(z).all()
    assert np.unique(z.round(5), axis=0).shape[0] > embedded.n_obs // 2  # cells differ
    again = embed_h5ad(export, h5ad, tmp_path / "again.h5ad", batch_size=7)
    np.testing.assert_allclose(ad.read_h5ad(again).obsm["X_cellfoundry"], z, rtol=1e-4, atol=1e-5)


def test_geneformer_export_loads_in_hugging_face(tiny_corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    values = settings(objective="geneformer_mlm", max_steps=5, **{"model.norm_first": False})
    export = train(values, family_inputs(tiny_corpus), tmp_path / "gf", seed=0)
    from cellfoundry.train.export import load_bert, load_pretrained

    ours, layout, _ = load_pretrained(export)
    tokens = torch.randint(3, layout.n_tokens, (3, 20), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = layout.cls_id
    tokens[2, 12:] = layout.pad_id
    padding = tokens == layout.pad_id
    with torch.inference_mode():
        mine = ours.mlm_head(ours.encode({"tokens": tokens, "padding_mask": padding}))
    # Hugging Face's own loader and ours give the same BERT.
    for hf in (transformers.BertForMaskedLM.from_pretrained(export).eval(), load_bert(export)):
        assert isinstance(hf, transformers.BertForMaskedLM) and not hf.training
        with torch.inference_mode():
            theirs = hf(input_ids=tokens, attention_mask=(~padding).long()).logits
        torch.testing.assert_close(mine[~padding], theirs[~padding], rtol=1e-4, atol=1e-4)


def test_only_a_bert_export_loads_as_bert(tiny_corpus, tmp_path):
    """`from_pretrained` on a binned-MLM export would return a random BERT; `load_bert` refuses
    it, and a folder without an export, in one line."""
    pytest.importorskip("transformers")
    from cellfoundry.errors import ModelFolderError
    from cellfoundry.train.export import load_bert

    export = train(settings(max_steps=2), inputs_of(tiny_corpus), tmp_path / "mlm", seed=0)
    with pytest.raises(
        ModelFolderError, match="not a BERT export: it holds a binned_mlm model"
    ) as e:
        load_bert(export)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelFolderError, match="no exported model here"):
        load_bert(tmp_path / "nothing")


def test_diffusion_model_generates_cells(tiny_corpus, tmp_path):
    values = settings(objective="diffusion", max_steps=20, **{"model.max_len": 48})
    export = train(values, family_inputs(tiny_corpus), tmp_path / "sedd", seed=0)
    cells = sample_cells(export, "hsapiens", 6, steps=12, seed=1)
    assert cells.shape == (6, 48)
    assert cells.X.min() >= 0 and cells.X.max() <= 50  # no MASK state left
    assert set(cells.var_names) <= set(pl.read_csv(tiny_corpus["panels"]["hsapiens"])["Ensembl_ID"])
    same = sample_cells(export, "hsapiens", 6, steps=12, seed=1)
    assert np.array_equal(cells.X, same.X)
    with pytest.raises(ValueError, match="needs a diffusion model"):
        sample_cells(
            train(settings(max_steps=2), inputs_of(tiny_corpus), tmp_path / "mlm", seed=0),
            "hsapiens",
            2,
        )


def test_contrastive_views_split_each_cell(tiny_corpus):
    values = settings(objective="contrastive")
    _, data, layout = build(values, family_inputs(tiny_corpus), seed=0)
    data.setup()
    plan = BatchPlan(data.train, 8, seed=0, within_dataset=True)
    batch = data.train.collection.gather(plan.batch(0))
    views = data.collate(batch, data.train, CellNoise(0, 0, batch.cells))
    for row in range(8):
        a = views["a"]["tokens"][row][~views["a"]["padding_mask"][row]]
        b = views["b"]["tokens"][row][~views["b"]["padding_mask"][row]]
        assert a[0] == layout.cls_id and b[0] == layout.cls_id
        assert set(a[1:].tolist()).isdisjoint(b[1:].tolist())  # the two views share no gene
    species = data.train.species[batch.shard]
    assert len(set(species)) == 1  # one dataset (so one species) per batch


def test_contrastive_subsample_views_differ_in_depth(tiny_corpus):
    """`contrastive_views: subsample`: each view keeps its own share ~ U(keep_min, 1) of the
    cell's genes, so the two views' gene counts differ (a cell's depth is not shared)."""
    values = settings(
        objective="contrastive", contrastive_views="subsample", **{"model.max_len": 4096}
    )
    _, data, layout = build(values, family_inputs(tiny_corpus), seed=0)
    data.setup()
    plan = BatchPlan(data.train, 8, seed=0, within_dataset=True)
    share_a, share_b = [], []
    for k in range(plan.batches_per_epoch):
        batch = data.train.collection.gather(plan.batch(k))
        views = data.collate(batch, data.train, CellNoise(0, k, batch.cells))
        for row in range(len(batch)):
            n_genes = int(batch.lengths[row])
            kept = []
            for view in (views["a"], views["b"]):
                tokens = view["tokens"][row][~view["padding_mask"][row]]
                assert tokens[0] == layout.cls_id
                kept.append(len(tokens) - 1)
            share_a.append(kept[0] / n_genes)
            share_b.append(kept[1] / n_genes)
    share_a, share_b = np.array(share_a), np.array(share_b)
    keep_min = values["contrastive_keep_min"]
    assert share_a.min() > keep_min - 0.15 and share_b.min() > keep_min - 0.15
    assert share_a.max() > 0.9 and share_a.min() < keep_min + 0.15  # spans U(keep_min, 1)
    # Independent shares: the views' gene counts differ by more than sampling noise.
    assert np.median(np.abs(share_a - share_b)) > 0.1
    assert abs(np.corrcoef(share_a, share_b)[0, 1]) < 0.3


def test_contrastive_view_len_caps_training_views_only(tiny_corpus):
    """`contrastive_view_len` cuts each training view to `<cls>` + its view_len - 1 highest-count
    genes; the cell embedding's view (the whole cell) still reads up to max_len tokens."""
    max_len, view_len = 48, 12
    values = settings(
        objective="contrastive",
        contrastive_views="subsample",
        contrastive_view_len=view_len,
        **{"model.max_len": max_len},
    )
    _, data, _ = build(values, family_inputs(tiny_corpus), seed=0)
    data.setup()
    plan = BatchPlan(data.train, 8, seed=0, within_dataset=True)
    batch = data.train.collection.gather(plan.batch(0))
    assert batch.lengths.min() > max_len  # every cell is longer than both limits
    views = data.collate(batch, data.train, CellNoise(0, 0, batch.cells))
    whole = data.collate(batch, data.train, CellNoise(0, 0, batch.cells), train=False)
    assert whole["tokens"].shape[1] == max_len and not whole["padding_mask"].any()
    for name in ("a", "b"):
        view = views[name]
        assert view["tokens"].shape[1] == view_len and not view["padding_mask"].any()
        for row in range(len(batch)):
            entries = slice(batch.offsets[row], batch.offsets[row + 1])
            count = dict(
                zip(batch.tokens[entries].tolist(), batch.counts[entries].tolist(), strict=True)
            )
            in_order = [count[g] for g in view["tokens"][row][1:].tolist()]
            assert in_order == sorted(in_order, reverse=True)
    # Without the setting a view fills max_len.
    plain = settings(
        objective="contrastive", contrastive_views="subsample", **{"model.max_len": max_len}
    )
    _, data, _ = build(plain, family_inputs(tiny_corpus), seed=0)
    data.setup()
    views = data.collate(batch, data.train, CellNoise(0, 0, batch.cells))
    assert views["a"]["tokens"].shape[1] == max_len


def test_contrastive_temperature_centering_and_normalised_rank(tiny_corpus):
    """`temperature` sets the learnable temperature's start; `contrastive_center` takes the
    batch mean out of both views before the CLIP loss (and leaves out the final norm's bias);
    `contrastive_rank: normalised` orders a view by count / corpus median."""
    from cellfoundry.models import losses

    values = settings(
        objective="contrastive",
        temperature=0.2,
        contrastive_center=True,
        contrastive_rank="normalised",
        **{"model.max_len": 4096},
    )
    system, data, _ = build(values, family_inputs(tiny_corpus), seed=0)
    model = system.model
    assert torch.isclose(model.logit_scale.exp(), torch.tensor(5.0))
    # Centring cancels the final norm's bias (a shift of every cell): the model has none.
    assert model.encoder.final_norm.bias is None and model.encoder.final_norm.weight is not None
    uncentred = build({**values, "contrastive_center": False}, family_inputs(tiny_corpus), seed=0)
    assert uncentred[0].model.encoder.final_norm.bias is not None
    data.setup()
    plan = BatchPlan(data.train, 8, seed=0, within_dataset=True)
    batch = data.train.collection.gather(plan.batch(0))
    views = data.collate(batch, data.train, CellNoise(0, 0, batch.cells))
    with torch.no_grad():
        z_a, z_b = model.cell_embedding(views["a"]), model.cell_embedding(views["b"])
        centred = losses.clip_loss(z_a - z_a.mean(0), z_b - z_b.mean(0), model.logit_scale)
        plain = losses.clip_loss(z_a, z_b, model.logit_scale)
        got = system.objective.loss(model, views)["loss"]
    assert torch.isclose(got, centred) and not torch.isclose(got, plain)
    # The whole cell (train=False): its genes in descending count / median order.
    whole = data.collate(batch, data.train, CellNoise(0, 0, batch.cells), train=False)
    assert (data.train.collection.gene_medians(batch.tokens) > 0).all()
    by_count = 0
    for row in range(len(batch)):
        tokens = whole["tokens"][row][~whole["padding_mask"][row]][1:].numpy()
        entries = slice(batch.offsets[row], batch.offsets[row + 1])
        counts = dict(
            zip(batch.tokens[entries].tolist(), batch.counts[entries].tolist(), strict=True)
        )
        in_order = np.array([counts[t] for t in tokens.tolist()])
        key = (in_order / data.train.collection.gene_medians(tokens)).tolist()
        assert len(tokens) == batch.lengths[row] and key == sorted(key, reverse=True)
        by_count += in_order.tolist() == sorted(counts.values(), reverse=True)
    assert by_count < len(batch)  # the order is not the count order


def test_length_grouping_reduces_padding(tiny_corpus):
    mappings = mappings_of(tiny_corpus)
    data = open_split(
        tiny_corpus["manifest"], "train", mappings, VocabularyLayout.from_mappings(mappings)
    )
    lengths = data.collection.cell_lengths()

    def padding(plan: BatchPlan) -> int:
        batches = [lengths[plan.batch(k)] for k in range(plan.batches_per_epoch)]
        return int(sum((b.max() - b).sum() for b in batches))

    grouped = BatchPlan(data, 8, seed=0, length_grouped=True)
    plain = BatchPlan(data, 8, seed=0)
    assert padding(grouped) < 0.5 * padding(plain)
    cells = np.concatenate([grouped.batch(k) for k in range(grouped.batches_per_epoch)])
    assert len(np.unique(cells)) == len(cells)


def test_presets_fill_under_user_values():
    config = validate_config({"train": {"preset": "geneformer_106m", "model": {"max_len": 512}}})
    model = config["train"]["model"]
    assert (model["d_model"], model["n_layers"], model["n_heads"], model["max_len"]) == (
        768,
        12,
        12,
        512,
    )
    assert config["train"]["objective"] == "geneformer_mlm"
    small = validate_config({"train": {"preset": "geneformer_10m"}})["train"]["model"]
    assert (small["d_model"], small["n_layers"], small["n_heads"], small["max_len"]) == (
        256,
        6,
        4,
        2048,
    )
    assert set(PRESETS) == {
        "small",
        "geneformer_10m",
        "geneformer_106m",
        "scgpt",
        "scconcept",
        "sedd",
    }
    with pytest.raises(ConfigError, match="unknown preset 'bert'"):
        validate_config({"train": {"preset": "bert"}})


# The centred contrastive loss compares cell embeddings that a fresh encoder makes nearly
# identical: subtracting their batch mean cancels all but a small difference, which amplifies
# float32 rounding (which differs with the split of the batch) to ~2e-5 in a few weights after
# 6 steps. It is compared in float64, where two ranks and one process agree to ~1e-14.
CENTRED_CONTRASTIVE = {
    "objective": "contrastive",
    "contrastive_views": "subsample",
    "contrastive_center": True,
    "temperature": 0.2,
    "contrastive_view_len": 32,
    "precision": "64-true",
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes", [{}, CENTRED_CONTRASTIVE], ids=["default", "centred_contrastive_float64"]
)
def test_two_ddp_processes_match_one_process(tiny_corpus, tmp_path, changes):
    """Two real DDP ranks (gloo, CPU) with 4 cells each train like one process with 8."""
    base = settings(max_steps=6, val_every_n_steps=100, **{"optimizer.warmup_steps": 1}, **changes)
    command = [
        sys.executable,
        "-m",
        "cellfoundry",
        "train",
        "--seed",
        "3",
        "--accelerator",
        "cpu",
        "--manifest",
        str(tiny_corpus["manifest"]),
        "--token-mappings",
        *map(str, tiny_corpus["token_mappings"].values()),
        "--summaries",
        *map(str, tiny_corpus["summaries"].values()),
    ]
    single = subprocess.run(
        [
            *command,
            "--settings",
            json.dumps(base),
            "--devices",
            "1",
            "--run-dir",
            str(tmp_path / "one"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    double = subprocess.run(
        [
            *command,
            "--settings",
            json.dumps({**base, "batch_size": TINY_TRAIN["batch_size"] // 2}),
            "--devices",
            "2",
            "--run-dir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert "rank 1 of world size 2" in double.stderr and "rank 0 of world size 2" in double.stderr
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    # Same global batch, same masks (hashed per cell), loss weighted by the global number of
    # masked positions: only the order of floating-point reductions differs.
    changed = 0
    # float64: torch's default tolerance for it (1e-7).
    tolerance = {} if one[next(iter(one))].dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for name in one:
        torch.testing.assert_close(one[name], two[name], **tolerance)
        changed += int(not torch.equal(one[name], two[name]))
    assert changed > 0  # the comparison is not vacuous


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("objective", ["binned_mlm", "geneformer_mlm", "contrastive", "diffusion"])
def test_two_ranks_validate_batches_that_do_not_split_evenly(tiny_corpus, tmp_path, objective):
    """Two real gloo ranks evaluate every validation cell, although the validation datasets'
    last batches (117 % 16 = 5 and 57 % 16 = 9 cells) do not split over two ranks: every
    collective (the contrastive all-gather above all) sees equal shapes."""
    values = settings(
        objective=objective,
        max_steps=2,
        batch_size=8,
        val_every_n_steps=2,
        val_batches=100,  # every validation batch, the short ones included
        **({"model.max_len": 32} if objective == "diffusion" else {}),
    )
    panels = [str(p) for p in tiny_corpus["panels"].values()]
    command = [
        sys.executable,
        "-m",
        "cellfoundry",
        "train",
        "--settings",
        json.dumps(values),
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--manifest",
        str(tiny_corpus["manifest"]),
        "--token-mappings",
        *map(str, tiny_corpus["token_mappings"].values()),
        "--summaries",
        *map(str, tiny_corpus["summaries"].values()),
        *(["--panels", *panels] if objective in ("contrastive", "diffusion") else []),
        "--run-dir",
        str(tmp_path / "run"),
    ]
    run = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 1 of world size 2" in run.stderr
    metrics = pl.read_csv(tmp_path / "run" / "logs" / "metrics.csv")
    val = metrics.filter(pl.col("val/loss").is_not_null())
    assert val["step"].to_list() == [0, 1] and np.isfinite(val["val/loss"].to_numpy()).all()
