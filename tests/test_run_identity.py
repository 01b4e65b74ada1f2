"""A run you can trust: its identity covers what changes the science and nothing else;
runtime changes and longer runs continue, changed inputs start a new identity, and nothing
is ever deleted (issue 14, point 1)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from cellfoundry.train.identity import run_identity
from cellfoundry.train.run import TrainInputs, train
from conftest import prepare_dataset
from test_train import settings


def inputs_at(project: Path, corpus: dict, *, summaries: dict | None = None) -> TrainInputs:
    """The tiny corpus' training inputs, read from `project` (a copy of the corpus' project)."""
    relative = {
        s: project / p.relative_to(corpus["project"]) for s, p in corpus["token_mappings"].items()
    }
    return TrainInputs(
        project / "manifests" / "shards.parquet",
        relative,
        summaries
        or {s: project / p.relative_to(corpus["project"]) for s, p in corpus["summaries"].items()},
        {},
    )


def copy_project(corpus: dict, to: Path) -> Path:
    """A copy of the tiny corpus' project whose shard manifest points into the copy."""
    shutil.copytree(corpus["project"], to)
    manifest = to / "manifests" / "shards.parquet"
    frame = pl.read_parquet(manifest)
    frame.with_columns(
        pl.col("shard").str.replace(str(corpus["project"]), str(to), literal=True)
    ).write_parquet(manifest)
    return to


def resumed_from(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming from")]


def final_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "final" / "config.json").read_text())


def test_identity_covers_science_not_runtime(tiny_corpus, tmp_path):
    base = settings()
    inputs = inputs_at(tiny_corpus["project"], tiny_corpus)

    def identity(values, inputs=inputs, world=1, precision="32-true"):
        return run_identity(values, inputs, seed=0, world_size=world, precision=precision).digest

    reference = identity(base)
    runtime = {
        "wandb.enabled": True,
        "tensorboard": True,
        "log_every_n_steps": 1,
        "num_workers": 2,
        "checkpoint_every_n_steps": 7,
        "keep_checkpoints": 9,
        "val_every_n_steps": 3,
        "val_batches": 5,
        "compile": True,
        "padding_free": True,
        "model.gradient_checkpointing": True,
        "max_steps": 1000,
        "run": "elsewhere",
    }
    for key, value in runtime.items():
        assert identity(settings(**{key: value})) == reference, key
    # The global batch is the science: 8 cells on each of 2 ranks = 16 cells on one.
    assert identity(settings(batch_size=4), world=2) == identity(settings(batch_size=8))
    assert identity(settings(batch_size=16)) != reference
    science = {"optimizer.lr": 0.01, "model.d_model": 64, "mask_ratio": 0.3, "length_grouped": True}
    for key, value in science.items():
        assert identity(settings(**{key: value})) != reference, key
    assert run_identity(base, inputs, seed=1, world_size=1, precision="32-true").digest != reference
    assert identity(base, precision="bf16-mixed") != reference
    # A moved project (same contents, other paths) is the same run.
    moved = copy_project(tiny_corpus, tmp_path / "moved")
    assert identity(base, inputs=inputs_at(moved, tiny_corpus)) == reference


@pytest.mark.slow
def test_extending_a_finished_run_continues(tiny_corpus, tmp_path, caplog):
    """Raising max_steps continues from the checkpoint at the start of the wsd decay, and gives
    the same weights as a run planned that long from the start."""
    caplog.set_level(logging.INFO)
    inputs = inputs_at(tiny_corpus["project"], tiny_corpus)
    values = {"optimizer.schedule": "wsd", "optimizer.decay_fraction": 0.2}
    run_dir = tmp_path / "run"
    train(settings(max_steps=20, **values), inputs, run_dir, seed=4)
    first_export = sorted((run_dir / "exports").iterdir())
    assert (run_dir / "checkpoints" / "decay-start-step0000016.ckpt").is_file()
    assert final_config(run_dir)["steps"] == 20

    caplog.clear()
    train(settings(max_steps=40, **values), inputs, run_dir, seed=4)
    assert resumed_from(caplog) == [
        f"resuming from {run_dir}/checkpoints/decay-start-step0000016.ckpt"
    ]
    assert final_config(run_dir)["steps"] == 40
    # The 20-step run's decay is not part of the longer run: its checkpoint moved aside.
    aside = list(run_dir.glob("superseded/*-max_steps20/checkpoints/step0000020.ckpt"))
    assert len(aside) == 1
    assert all(p.is_dir() for p in first_export)  # the 20-step export is still there
    metrics = pl.read_csv(run_dir / "logs" / "metrics.csv")
    assert metrics["step"].max() == 39 and metrics.filter(pl.col("step") == 0).height > 0

    straight = tmp_path / "straight"
    train(settings(max_steps=40, **values), inputs, straight, seed=4)
    extended = load_file(run_dir / "final" / "model.safetensors")
    planned = load_file(straight / "final" / "model.safetensors")
    for name in planned:
        torch.testing.assert_close(extended[name], planned[name], rtol=1e-4, atol=1e-5)
    assert final_config(run_dir)["identity"] == final_config(straight)["identity"]


@pytest.mark.slow
def test_runtime_settings_resume(tiny_corpus, tmp_path, caplog, monkeypatch):
    """Switching W&B on (and changing logging, workers, checkpoint cadence) resumes the run."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    caplog.set_level(logging.INFO)
    inputs = inputs_at(tiny_corpus["project"], tiny_corpus)
    run_dir = tmp_path / "run"
    train(settings(max_steps=10), inputs, run_dir, seed=0)
    checkpoint = run_dir / "checkpoints" / "step0000010.ckpt"
    written = checkpoint.stat().st_mtime_ns
    identity = final_config(run_dir)["identity"]

    caplog.clear()
    changed = settings(
        max_steps=10,
        log_every_n_steps=2,
        num_workers=1,
        checkpoint_every_n_steps=5,
        **{"wandb.enabled": True},
    )
    train(changed, inputs, run_dir, seed=0)
    assert resumed_from(caplog) == [f"resuming from {checkpoint}"]
    assert checkpoint.stat().st_mtime_ns == written  # nothing trained again
    assert not (run_dir / "superseded").exists()
    assert final_config(run_dir)["identity"] == identity
    assert (run_dir / "wandb").is_dir()
    metrics = pl.read_csv(run_dir / "logs" / "metrics.csv")
    assert metrics.filter(pl.col("val/loss").is_not_null())["step"].min() == 0


def rewrite_shards(project: Path, corpus: dict, n_bins: int) -> None:
    """Prepare the datasets' files again, in place, with another number of value bins."""
    for name in corpus["datasets"]:
        shutil.rmtree(project / "shards" / name)
        prepare_dataset(project, corpus["demo"], name, corpus["config"], n_bins=n_bins)


@pytest.mark.slow
def test_changed_n_bins_or_medians_start_a_new_identity(tiny_corpus, tmp_path, caplog):
    """Shards rewritten with other bins, or new corpus medians, start a new identity; the
    previous checkpoints, logs and export stay on disk."""
    caplog.set_level(logging.INFO)
    project = copy_project(tiny_corpus, tmp_path / "project")
    inputs = inputs_at(project, tiny_corpus)
    run_dir = tmp_path / "run"
    train(settings(max_steps=10), inputs, run_dir, seed=0)
    first = final_config(run_dir)["identity"]

    # Same manifest file, same paths: only the shards' contents changed.
    manifest_bytes = inputs.manifest.read_bytes()
    rewrite_shards(project, tiny_corpus, n_bins=21)
    assert inputs.manifest.read_bytes() == manifest_bytes
    caplog.clear()
    train(settings(max_steps=10), inputs, run_dir, seed=0)
    second = final_config(run_dir)
    assert second["identity"] != first and second["model"]["n_bins"] == 21
    assert resumed_from(caplog) == []
    assert any("inputs/shards/demo_brain" in r.getMessage() for r in caplog.records)
    kept = list(run_dir.glob(f"superseded/*-{first}/checkpoints/step0000010.ckpt"))
    assert len(kept) == 1 and list(run_dir.glob(f"superseded/*-{first}/logs/metrics.csv"))
    assert (run_dir / "exports" / f"{first}-step10" / "model.safetensors").is_file()

    # New medians (as a changed target_sum or a new dataset gives): a new identity again.
    summaries = {}
    for species, path in inputs.summaries.items():
        summaries[species] = tmp_path / "medians" / f"{species}.summary.parquet"
        summaries[species].parent.mkdir(exist_ok=True)
        table = pl.read_parquet(path)
        table.with_columns(pl.col("nonzero_median") * 2).write_parquet(summaries[species])
    caplog.clear()
    train(
        settings(max_steps=10),
        inputs_at(project, tiny_corpus, summaries=summaries),
        run_dir,
        seed=0,
    )
    third = final_config(run_dir)["identity"]
    assert third not in (first, second["identity"])
    assert any("inputs/summaries/hsapiens" in r.getMessage() for r in caplog.records)
    assert len(list(run_dir.glob("superseded/*/checkpoints/step0000010.ckpt"))) == 2
    assert len(list((run_dir / "exports").iterdir())) == 3
