"""Training: vocabulary layout, batch plans, tokenization, optimisation recipe, export and resume."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from cellfoundry.cli import apply_overrides
from cellfoundry.config import section_defaults
from cellfoundry.embeddings import read_csv
from cellfoundry.train.data import (
    BatchPlan,
    CellNoise,
    CollatedBatches,
    PlannedBatches,
    VocabularyLayout,
    dataset_targets,
    n_cells,
    open_split,
)
from cellfoundry.train.export import gene_embedding_matrix, load_pretrained
from cellfoundry.train.run import TrainInputs, build, train
from cellfoundry.train.system import OptimizerConfig, lr_factor, parameter_groups, shared_steps
from cellfoundry.vocabulary import read_token_mapping
from conftest import TINY_TRAIN


def settings(**changes) -> dict:
    values = json.loads(json.dumps(TINY_TRAIN))
    for key, value in changes.items():
        apply_overrides(values, [f"{key}={json.dumps(value)}"])
    return section_defaults("train", values)


def inputs_of(corpus, *, embeddings: bool = True) -> TrainInputs:
    return TrainInputs(
        corpus["manifest"],
        corpus["token_mappings"],
        corpus["summaries"],
        corpus["embeddings"] if embeddings else {},
    )


def mappings_of(corpus):
    return {s: read_token_mapping(s, p) for s, p in corpus["token_mappings"].items()}


def test_vocabulary_layout_separates_species(tiny_corpus):
    mappings = mappings_of(tiny_corpus)
    layout = VocabularyLayout.from_mappings(mappings)
    human, mouse = layout.local_to_global["hsapiens"], layout.local_to_global["mmusculus"]
    for lut, mapping in ((human, mappings["hsapiens"]), (mouse, mappings["mmusculus"])):
        assert (lut[mapping.cls_id], lut[mapping.pad_id], lut[mapping.mask_id]) == (0, 1, 2)
    assert set(human[human >= 3]).isdisjoint(mouse[mouse >= 3])
    assert (
        layout.n_tokens
        == 3 + mappings["hsapiens"].gene_table.height + mappings["mmusculus"].gene_table.height
    )
    assert layout.gene_range("hsapiens") == (3, 3 + mappings["hsapiens"].gene_table.height)


def test_batch_plan_is_seeded_and_independent_of_world_size(tiny_corpus):
    mappings = mappings_of(tiny_corpus)
    data = open_split(
        tiny_corpus["manifest"], "train", mappings, VocabularyLayout.from_mappings(mappings)
    )
    plan = BatchPlan(data, 16, seed=3)
    again = BatchPlan(data, 16, seed=3)
    assert all(
        np.array_equal(plan.batch(k), again.batch(k)) for k in range(plan.batches_per_epoch + 3)
    )
    first_epoch = np.concatenate([plan.batch(k) for k in range(plan.batches_per_epoch)])
    assert len(np.unique(first_epoch)) == len(first_epoch)  # an epoch never repeats a cell
    single = list(PlannedBatches(plan, rank=0, world_size=1, limit=3))
    ranks = [list(PlannedBatches(plan, rank=r, world_size=2, limit=3)) for r in (0, 1)]
    for k in range(3):
        assert np.array_equal(single[k][1], np.concatenate([ranks[0][k][1], ranks[1][k][1]]))
    resumed = next(iter(PlannedBatches(plan, rank=0, world_size=1, start=2)))
    assert resumed[0] == 2 and np.array_equal(resumed[1], single[2][1])
    grouped = BatchPlan(data, 16, seed=3, within_dataset=True)
    shard = data.collection.shard_of(
        np.concatenate([grouped.batch(k) for k in range(5)]).reshape(5, 16)
    )
    assert all(len(set(data.datasets[row])) == 1 for row in shard)


def test_binned_collate_masks_only_genes(tiny_corpus):
    _, data, layout = build(settings(), inputs_of(tiny_corpus), seed=0)
    data.setup()
    cells = np.arange(12)
    batch = data.train.collection.gather(cells)
    out = data.collate(batch, data.train, CellNoise(0, 0, batch.cells))
    tokens, mask, padding = out["tokens"], out["loss_mask"], out["padding_mask"]
    assert tokens.shape[1] <= 64 and (tokens[:, 0] == layout.cls_id).all()
    assert not mask[:, 0].any() and not (mask & padding).any()
    assert (out["values"][mask] == 51).all()  # the MASK value state
    assert ((out["targets"][mask] >= 1) & (out["targets"][mask] <= 50)).all()
    assert (tokens[padding] == layout.pad_id).all()
    assert 0.05 < mask.sum() / (~padding).sum() < 0.3
    packed = build(settings(padding_free=True), inputs_of(tiny_corpus), seed=0)[1].collate(
        batch, data.train, CellNoise(0, 0, batch.cells)
    )
    assert torch.equal(packed["tokens"], tokens[~padding])
    assert torch.equal(packed["loss_mask"], mask[~padding])


def test_optimizer_groups_and_schedule(tiny_corpus):
    system, _, _ = build(settings(), inputs_of(tiny_corpus), seed=0)
    decay, no_decay = parameter_groups(system.model, 0.01)
    names = {id(p): n for n, p in system.model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"])
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert any("norm" in n for n in exempt) and any(n.endswith("bias") for n in exempt)
    assert "encoder.embeddings.token_embedding.weight" in exempt
    cosine = OptimizerConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="cosine")
    assert lr_factor(0, cosine) == pytest.approx(0.1)
    assert lr_factor(9, cosine) == pytest.approx(1.0)
    assert lr_factor(60, cosine) == pytest.approx(0.55)
    assert lr_factor(110, cosine) == pytest.approx(0.1)
    # Warmup-stable-decay: a 1-sqrt decay over the last 20% (steps 88..110).
    wsd = OptimizerConfig(
        warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2
    )
    assert wsd.decay_start == 88
    assert lr_factor(0, wsd) == pytest.approx(0.1)
    assert lr_factor(60, wsd) == lr_factor(88, wsd) == pytest.approx(1.0)
    assert lr_factor(99, wsd) == pytest.approx(0.1 + 0.9 * (1 - 0.5**0.5))
    assert lr_factor(110, wsd) == pytest.approx(0.1)
    # A longer wsd run shares every step before the shorter one's decay; cosine only warmup.
    longer = replace(wsd, max_steps=220)
    assert shared_steps(wsd, longer) == 88
    assert all(lr_factor(s, wsd) == lr_factor(s, longer) for s in range(88))
    assert lr_factor(88 + 5, wsd) != lr_factor(88 + 5, longer)
    assert shared_steps(cosine, replace(cosine, max_steps=220)) == 10
    assert shared_steps(wsd, wsd) is None
    assert shared_steps(wsd, replace(wsd, lr=0.5)) == 0


def test_gene_embeddings_land_on_their_tokens(tiny_corpus):
    mappings = mappings_of(tiny_corpus)
    layout = VocabularyLayout.from_mappings(mappings)
    matrix, found = gene_embedding_matrix(layout, mappings, tiny_corpus["embeddings"])
    ids, vectors = read_csv(tiny_corpus["embeddings"]["mmusculus"])
    row = int(np.flatnonzero(np.any(vectors != 0, axis=1))[0])
    token = layout.local_to_global["mmusculus"][mappings["mmusculus"].token_of(ids[row])]
    assert np.allclose(matrix[token], vectors[row])
    assert (matrix[:3] == 0).all()
    assert found["mmusculus"] == int(np.any(vectors != 0, axis=1).sum())


def test_train_export_and_load_give_the_same_outputs(tiny_corpus, tmp_path):
    export = train(settings(max_steps=12), inputs_of(tiny_corpus), tmp_path / "run", seed=1)
    config = json.loads((export / "config.json").read_text())
    assert config["steps"] == 12 and config["objective"] == "binned_mlm"
    assert sorted(p.name for p in (export / "token_mappings").iterdir()) == [
        "hsapiens.csv",
        "mmusculus.csv",
    ]
    model, layout, _ = load_pretrained(export)
    system, data, _ = build(settings(max_steps=12), inputs_of(tiny_corpus), seed=1)
    state = load_file(export / "model.safetensors")
    system.model.load_state_dict(state, strict=False)  # tied weights are stored once
    data.setup()
    gathered = data.val.collection.gather(np.arange(8))
    batch = data.collate(gathered, data.val, CellNoise(0, 0, gathered.cells))
    system.model.eval()
    with torch.inference_mode():
        assert torch.equal(model.cell_embedding(batch), system.model.cell_embedding(batch))
        a = model.value_head(model.encode(batch))
        b = system.model.value_head(system.model.encode(batch))
    assert torch.equal(a, b)
    assert layout.n_tokens == model.config.encoder.vocab_size
    metrics = pl.read_csv(tmp_path / "run" / "logs" / "metrics.csv")
    val = metrics.filter(pl.col("val/loss").is_not_null()).sort("step")["val/loss"].to_list()
    assert val[-1] < val[0]


@pytest.mark.slow
def test_interrupted_training_resumes_from_its_checkpoint(tiny_corpus, tmp_path):
    args = [
        sys.executable,
        "-m",
        "cellfoundry",
        "train",
        "--settings",
        json.dumps(settings(max_steps=40)),
        "--seed",
        "2",
        "--manifest",
        str(tiny_corpus["manifest"]),
        "--token-mappings",
        *map(str, tiny_corpus["token_mappings"].values()),
        "--summaries",
        *map(str, tiny_corpus["summaries"].values()),
    ]
    run_dir = tmp_path / "interrupted"
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen(
        [*args, "--run-dir", str(run_dir)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 600
    while not list(run_dir.glob("checkpoints/step*.ckpt")):
        assert process.poll() is None, (tmp_path / "first.log").read_text()
        assert time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(
        int(p.stem.removeprefix("step")) for p in run_dir.glob("checkpoints/step*.ckpt")
    )
    assert killed_at < 40 and not (run_dir / "final").exists()

    second = subprocess.run(
        [*args, "--run-dir", str(run_dir)], capture_output=True, text=True, check=False
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {run_dir}/checkpoints/step{killed_at:07d}.ckpt" in second.stderr
    assert json.loads((run_dir / "final" / "config.json").read_text())["steps"] == 40
    metrics = pl.read_csv(run_dir / "logs" / "metrics.csv")
    assert metrics["step"].max() == 39

    # The resumed run saw the same batches as an uninterrupted one: same weights.
    straight = subprocess.run(
        [*args, "--run-dir", str(tmp_path / "straight")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed = load_file(run_dir / "final" / "model.safetensors")
    uninterrupted = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-4, atol=1e-5)


def test_changed_settings_start_afresh(tiny_corpus, tmp_path):
    train(
        settings(max_steps=10), inputs_of(tiny_corpus, embeddings=False), tmp_path / "run", seed=0
    )
    assert (tmp_path / "run" / "checkpoints" / "step0000010.ckpt").is_file()
    os.environ.pop("LOCAL_RANK", None)
    train(
        settings(max_steps=10, **{"optimizer.lr": 0.01}),
        inputs_of(tiny_corpus, embeddings=False),
        tmp_path / "run",
        seed=0,
    )
    metrics = pl.read_csv(tmp_path / "run" / "logs" / "metrics.csv")
    assert (
        metrics.filter(pl.col("val/loss").is_not_null())["step"].min() == 0
    )  # trained again from step 0
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["train"]["optimizer"]["lr"] == 0.01


def test_command_line_overrides():
    values = apply_overrides(
        {"model": {"d_model": 8}}, ["model.d_model=256", "max_steps=7", "wandb.enabled=true"]
    )
    assert values == {"model": {"d_model": 256}, "max_steps": 7, "wandb": {"enabled": True}}
    full = section_defaults("train", values)
    assert full["model"]["n_layers"] == 2 and full["precision"] == "auto"


def test_every_dataset_is_trained_on_with_one_dataset_batches(tiny_corpus, caplog):
    """With a global batch larger than demo_retina's training cells, its cells join the
    remainders of the other mouse dataset in batches of one species, and the plan says so."""
    mappings = mappings_of(tiny_corpus)
    data = open_split(
        tiny_corpus["manifest"], "train", mappings, VocabularyLayout.from_mappings(mappings)
    )
    sizes = dict.fromkeys(data.dataset_names, 0)
    for (start, stop), dataset in zip(data.collection.shard_ranges(), data.datasets, strict=True):
        sizes[data.dataset_name(int(dataset))] += stop - start
    global_batch = sizes["demo_retina"] + 1  # retina alone never fills a batch
    assert global_batch <= sizes["demo_retina"] + sizes["demo_brain"], sizes  # pooled, it does
    plan = BatchPlan(data, global_batch, seed=1, within_dataset=True)
    retina = data.dataset_names.index("demo_retina")
    seen = set()
    for epoch in range(20):
        batches = plan.epoch_plan(epoch)
        for batch in batches:
            assert len(set(data.species[data.collection.shard_of(batch)])) == 1  # one species
        cells = np.concatenate(batches)
        assert len(np.unique(cells)) == len(cells)
        seen |= {int(c) for c in cells if plan.dataset_of_cell[c] == retina}
        counts = plan.cells_per_dataset(epoch)
        assert counts["demo_retina"][0] > 0 and counts["demo_retina"][1] == sizes["demo_retina"]
    assert len(seen) == sizes["demo_retina"]  # every cell is reached within a few epochs
    caplog.set_level(logging.INFO)
    next(iter(PlannedBatches(plan, rank=0, world_size=1, log_epochs=True)))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch 0:"))
    retina_seen, retina_total = plan.cells_per_dataset(0)["demo_retina"]
    assert f"demo_retina {retina_seen}/{retina_total}" in line


def test_a_dataset_whose_pooled_rest_never_fills_a_batch_is_named(caplog):
    """Datasets of 50 and 3 cells, batches of 16: the 3 cells only ever join the big one's rest
    of 2, and 5 cells never fill a batch, so the small dataset is never trained on although its
    species is; the plan warns about it by name (and not about a rest that does fill one)."""
    plan = BatchPlan(_two_dataset_split(50, 3), 16, seed=0, within_dataset=True)
    assert plan.untrained == {"small": 3} and not plan.unreachable
    assert all(plan.cells_per_dataset(e)["small"] == (0, 3) for e in range(5))
    caplog.set_level(logging.WARNING)
    plan.log_epoch(0)
    assert any("dataset small: 3 training cells" in r.getMessage() for r in caplog.records)
    filled = BatchPlan(_two_dataset_split(60, 5), 16, seed=0, within_dataset=True)  # 12 + 5
    assert filled.untrained == {}
    assert sum(filled.cells_per_dataset(e)["small"][0] for e in range(10)) > 0
    assert BatchPlan(_two_dataset_split(50, 3), 16, seed=0).untrained == {}  # mixed batches


def _two_dataset_split(big: int, small: int) -> SimpleNamespace:
    """The parts of a SplitData a BatchPlan reads: one species, a big and a small dataset, and
    a third whose cells all went to validation (an empty shard)."""
    ranges = [(0, big), (big, big + small), (big + small, big + small)]
    names = ["big", "small", "all_validation"]
    return SimpleNamespace(
        collection=SimpleNamespace(shard_ranges=lambda: ranges),
        datasets=np.array([0, 1, 2]),
        species=np.array(["hsapiens"] * 3, dtype=object),
        dataset_names=names,
        dataset_name=names.__getitem__,
    )


def test_dataset_alpha_rebalances_the_datasets_of_an_epoch():
    """alpha 0.5 gives the datasets N n^0.5 / sum n^0.5 of an epoch's N cells (XLM's rule):
    the small one repeats its cells and the big one is subsampled without repeats, a different
    subset each epoch; one-dataset batches never hold a cell twice; alpha 1 is the plan without
    rebalancing, batch for batch."""
    data = _two_dataset_split(400, 40)
    assert dataset_targets([400, 40], 0.5) == [334, 106]  # 440 x 20 / 26.32, 440 x 6.32 / 26.32
    assert dataset_targets([400, 40], 0.0) == [220, 220]
    assert dataset_targets([400, 40], 1.0) == [400, 40]
    assert dataset_targets([400, 40, 0], 0.5) == [334, 106, 0]
    for within in (True, False):
        plain = BatchPlan(data, 8, seed=4, within_dataset=within)
        same = BatchPlan(data, 8, seed=4, within_dataset=within, dataset_alpha=1.0)
        assert all(np.array_equal(plain.batch(k), same.batch(k)) for k in range(60))
        plan = BatchPlan(data, 8, seed=4, within_dataset=within, dataset_alpha=0.5)
        assert plan.batches_per_epoch == 55  # as many cells as the split holds
        subsets = []
        for epoch in range(2):
            batches = plan.epoch_plan(epoch)
            cells = np.concatenate(batches)
            small = cells[cells >= 400]
            assert len(small) == 106 and set(np.bincount(small - 400)) <= {2, 3, 4}
            if not within:  # one stream of fresh permutations: each cell 2 or 3 times
                assert set(np.bincount(small - 400)) == {2, 3}
            else:  # cut from whole permutations: no batch holds a cell twice
                assert all(len(np.unique(b)) == len(b) for b in batches)
            big = cells[cells < 400]
            assert len(big) == 334 == len(np.unique(big))
            subsets.append(set(big.tolist()))
            assert plan.cells_per_dataset(epoch) == {"big": (334, 400), "small": (106, 40)}
        assert subsets[0] != subsets[1]  # each epoch draws its own subset of the big dataset
        again = BatchPlan(data, 8, seed=4, within_dataset=within, dataset_alpha=0.5)
        assert all(np.array_equal(plan.batch(k), again.batch(k)) for k in range(120))
    # Equal shares: the 40-cell dataset fills 520 / 32 batches, each from one permutation.
    equal = BatchPlan(
        _two_dataset_split(1000, 40), 32, seed=1, within_dataset=True, dataset_alpha=0
    )
    batches = equal.epoch_plan(0)
    assert sum(bool((b >= 1000).all()) for b in batches) == 16
    assert all(len(np.unique(b)) == 32 for b in batches)
    # A dataset smaller than a batch cannot fill one without repeats: it keeps its own cells.
    tiny = BatchPlan(_two_dataset_split(400, 5), 8, seed=1, within_dataset=True, dataset_alpha=0)
    assert tiny.dataset_targets == [202, 5, 0]  # its equal share would be 202 (405 / 2)
    with pytest.raises(ValueError, match="dataset_alpha must lie in"):
        BatchPlan(data, 8, seed=4, dataset_alpha=1.5)
    with pytest.raises(ValueError, match="length_grouped"):
        BatchPlan(data, 8, seed=4, dataset_alpha=0.5, length_grouped=True)


def test_uneven_batches_split_into_equal_shapes(tiny_corpus):
    """A global batch that does not divide over the ranks is padded to equal slices; the real
    cells of all slices are the batch, and padding cells carry no loss."""
    mappings = mappings_of(tiny_corpus)
    layout = VocabularyLayout.from_mappings(mappings)
    data = open_split(tiny_corpus["manifest"], "val", mappings, layout)
    plan = BatchPlan(data, 16, seed=0, within_dataset=True, drop_last=False, min_cells=4)
    short = [k for k in range(plan.batches_per_epoch) if len(plan.batch(k)) % 4]
    assert short  # the val split holds batches of 117 % 16 = 5 and 57 % 16 = 9 cells
    for k in short:
        slices = [
            next(iter(PlannedBatches(plan, rank=r, world_size=4, start=k, limit=k + 1)))
            for r in range(4)
        ]
        assert len({len(cells) for _, cells, _ in slices}) == 1
        real = np.concatenate([cells[: len(cells) - pad] for _, cells, pad in slices])
        assert np.array_equal(np.sort(real), np.sort(plan.batch(k)))
    _system, module, _ = build(settings(), inputs_of(tiny_corpus), seed=0)
    dataset = CollatedBatches(data, module.collate, seed=0)
    k, cells, pad = slices[-1]
    assert pad > 0
    batch = dataset[(k, cells, pad)]
    assert int(batch["cell_mask"].sum()) == len(cells) - pad == n_cells(batch)
    assert not batch["loss_mask"][~batch["cell_mask"]].any()


def test_dropped_gene_counts_appear_in_the_training_log(tiny_corpus, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    train(settings(max_steps=2), inputs_of(tiny_corpus, embeddings=False), tmp_path / "run", seed=0)
    manifest = pl.read_parquet(tiny_corpus["manifest"])
    messages = [r.getMessage() for r in caplog.records]
    for dataset, split, species in manifest.select("dataset", "split", "species").unique().rows():
        vocabulary = set(pl.read_csv(tiny_corpus["token_mappings"][species])["gene_id"])
        genes = set()
        for shard in manifest.filter((pl.col("dataset") == dataset) & (pl.col("split") == split))[
            "shard"
        ]:
            genes |= set(pl.read_parquet(f"{shard}/var.parquet")["gene_id"])
        outside = len(genes - vocabulary)
        assert outside > 0
        expected = (
            f"{dataset} ({split}): {outside} of {len(genes)} genes are outside the model's "
            "vocabulary and dropped when loading"
        )
        assert expected in messages
