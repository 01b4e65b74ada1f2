"""The workflow run for real by Snakemake: the demo corpus, the real datasets, incremental runs,
reproducibility and bad input failing alone."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import polars as pl
import pytest

from cellfoundry.demo import DEMO_DATASETS
from cellfoundry.train.identity import checkpoint_step
from conftest import REPO, Project, parse_job_stats, run

pytestmark = pytest.mark.slow

PREP_RULES = {
    "preprocess",
    "aggregate_dataset",
    "gene_stats",
    "vocabulary",
    "panel_hvg",
    "splits",
    "shard_manifest",
}
# A tiny model and short training keep the suite fast; the default config trains a larger one.
FAST = {
    "embeddings": {"coexpression": {"method": "coexpression", "dim": 16}},
    "train": {
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_len": 128},
        "batch_size": 16,
        "max_steps": 60,
        "val_every_n_steps": 20,
        "val_batches": 4,
        "checkpoint_every_n_steps": 20,
        "optimizer": {"lr": 0.003, "warmup_steps": 10},
    },
}
# The jobs a one-dataset change reruns: its own chain and the aggregations over its species.
SPECIES_CHAIN = {
    "preprocess": 1, "aggregate_dataset": 1, "gene_stats": 1, "vocabulary": 1, "panel_hvg": 1,
    "splits": 1,
    "shard_manifest": 1, "gene_embeddings": 1, "train": 1, "report_corpus": 1, "report_training": 1,
    "report_embeddings": 1, "report_evaluation": 1,
}  # fmt: skip


def demo_rows(project_root: Path, names: list[str] | None = None) -> list[dict[str, object]]:
    rows = [
        {"dataset": d.name, "species": d.species, "path": str(project_root / "demo" / d.path)}
        for d in DEMO_DATASETS
    ]
    return [r for r in rows if names is None or r["dataset"] in names]


def digest(path: Path) -> str:
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".snakemake")
        )
        return hashlib.sha256(
            b"".join(p.relative_to(path).as_posix().encode() + p.read_bytes() for p in files)
        ).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_project(tmp_path_factory) -> Project:
    """The default pipeline run once, for real, on the simulated demo corpus."""
    root = tmp_path_factory.mktemp("demo")
    project = Project(root, demo_rows(root), FAST)
    result = project.snakemake()
    assert result.returncode == 0, result.stdout[-5000:]
    project.terminal = result.stdout  # what a local run shows (stdout and stderr)
    return project


def test_demo_run_writes_the_scconcept_layout(demo_project):
    results = demo_project.results
    for d in DEMO_DATASETS:
        h5ads = sorted((results / "data" / d.name / "h5ads").glob("*.h5ad"))
        assert h5ads, d.name
        adata = ad.read_h5ad(h5ads[0])
        assert adata.X.dtype == np.int32 and adata.var_names.str.startswith("ENS").all()
        assert {"gene_name"} <= set(adata.var.columns)
        assert {"total_counts", "n_genes_by_counts", "mito_fraction"} <= set(adata.obs.columns)
        qc = json.loads((results / "qc" / d.name / "qc.json").read_text())
        assert qc["cells_kept"] < qc["cells_in"]  # the demo holds QC-failing cells
        assert (results / "qc" / d.name / "qc.png").stat().st_size > 10_000
        for h5ad in h5ads:  # one preprocessing job per input file, with its log and benchmark
            assert (results / "logs" / "preprocess" / d.name / f"{h5ad.stem}.log").is_file()
            assert (results / "benchmarks" / "preprocess" / d.name / f"{h5ad.stem}.tsv").is_file()
            assert (results / "shards" / d.name / h5ad.stem / "entries.npy").is_file()
    for species in ("hsapiens", "mmusculus"):
        mapping = pl.read_csv(
            results / "references" / "vocabulary" / "token_mappings_per_specie" / f"{species}.csv"
        )
        assert mapping.columns == ["gene_id", "gene_name", "token"]
        assert mapping["gene_id"][:3].to_list() == ["<cls>", "<pad>", "<mask>"]
        panel = pl.read_csv(results / "panels" / species / "hvg.csv")
        assert panel.height == 1000 and set(panel["Ensembl_ID"]) <= set(mapping["gene_id"])
    manifest = pl.read_parquet(results / "manifests" / "shards.parquet")
    assert set(manifest["split"]) == {"train", "val"}
    assert set(manifest["dataset"]) == {d.name for d in DEMO_DATASETS}
    assert sorted(p.name for p in (results / "splits").glob("*.yaml")) == sorted(
        f"{d.name}.yaml" for d in DEMO_DATASETS
    )


def test_demo_run_trains_a_model_that_loads_and_learned(demo_project):
    from cellfoundry.train.export import load_pretrained

    final = demo_project.results / "model_checkpoints" / "demo" / "final"
    model, layout, config = load_pretrained(final)
    assert config["steps"] == FAST["train"]["max_steps"]
    assert layout.species == ("hsapiens", "mmusculus")
    assert sum(p.numel() for p in model.parameters()) > 0
    metrics = pl.read_csv(
        demo_project.results / "model_checkpoints" / "demo" / "logs" / "metrics.csv"
    )
    val = metrics.filter(pl.col("val/loss").is_not_null()).sort("step")
    assert val["step"][0] == 0 and val.height >= 3
    assert val["val/loss"][-1] < val["val/loss"][0]
    for species in ("hsapiens", "mmusculus"):
        embedding = (
            demo_project.results / "references" / "embeddings" / "coexpression" / f"{species}.csv"
        )
        header = embedding.read_text().splitlines()[0].split(",")
        assert header[0] == "gene_id" and len(header) == 17
    accuracy = pl.read_csv(
        demo_project.results / "report" / "cell_embeddings_demo.tsv", separator="\t"
    )
    assert set(accuracy["dataset"]) == {
        "demo_pbmc_ids",
        "demo_pbmc_symbols",
        "demo_brain",
        "demo_retina",
    }


def test_progress_shows_on_the_terminal_and_in_the_logs(demo_project):
    """A local run shows the training progress (step, loss, cells/s, ETA) and each file's
    preprocessing line on the terminal, and the same lines are in the jobs' logs."""
    progress = re.compile(
        rf"^step \d+/{FAST['train']['max_steps']}  loss \d+\.\d+  [\d,]+ cells/s  ETA \S+$", re.M
    )
    logs = demo_project.results / "logs"
    logged = progress.findall((logs / "train" / "demo.log").read_text())
    assert len(logged) >= 3
    assert progress.findall(demo_project.terminal) == logged
    for d in DEMO_DATASETS:
        for h5ad in (demo_project.results / "data" / d.name / "h5ads").glob("*.h5ad"):
            log = (logs / "preprocess" / d.name / f"{h5ad.stem}.log").read_text()
            (line,) = re.findall(rf"{d.name}: {h5ad.stem}\.\w+: \d+/\d+ cells kept.*", log)
            assert line in demo_project.terminal


def test_parquet_outputs_read_with_pandas(demo_project):
    """Every parquet output reads with pandas (pyarrow) as it does with polars."""
    import pandas as pd

    results = demo_project.results
    files = sorted(results.rglob("*.parquet"))
    for name in ("manifests/shards.parquet", "manifests/holdout.parquet", "stats/species/hsapiens.summary.parquet", "stats/datasets/demo_brain.parquet"):  # fmt: skip
        assert results / name in files, name
    for path in files:
        frame, expected = pd.read_parquet(path), pl.read_parquet(path)
        assert list(frame.columns) == expected.columns and len(frame) == expected.height, path
    manifest = pd.read_parquet(results / "manifests" / "shards.parquet")
    assert set(manifest["dataset"]) == {d.name for d in DEMO_DATASETS}
    holdout = pd.read_parquet(results / "manifests" / "holdout.parquet")
    assert holdout.groupby("dataset")["cell"].count().min() > 0


def test_complete_run_has_nothing_left_to_do(demo_project):
    assert demo_project.planned_jobs() == {}


def test_one_dataset_setting_reruns_only_its_chain(demo_project):
    rows = demo_project.datasets
    changed = [dict(r, min_genes=150) if r["dataset"] == "demo_brain" else r for r in rows]
    jobs = demo_project.planned_jobs(config=demo_project.write(changed, FAST, name="-changed"))
    assert jobs.pop("all") == 1
    # demo_brain's own chain, the mouse aggregations and what is trained on the corpus;
    # nothing of the other datasets.
    assert jobs == SPECIES_CHAIN
    config = demo_project.root / "config-changed.yaml"
    assert demo_project.planned_wildcards("preprocess", config=config) == [
        "dataset=demo_brain, file=demo_brain"
    ]
    assert demo_project.planned_wildcards("gene_stats", config=config) == ["species=mmusculus"]


def test_adding_a_dataset_adds_only_its_jobs(demo_project):
    extra = {
        "dataset": "demo_brain_copy",
        "species": "mmusculus",
        "path": str(demo_project.root / "demo" / "demo_brain.h5ad"),
    }
    jobs = demo_project.planned_jobs(
        config=demo_project.write([*demo_project.datasets, extra], FAST, name="-added")
    )
    jobs.pop("all")
    assert jobs == SPECIES_CHAIN
    assert demo_project.planned_wildcards(
        "aggregate_dataset", config=demo_project.root / "config-added.yaml"
    ) == ["dataset=demo_brain_copy"]


def test_a_folder_dataset_reruns_only_the_files_that_changed(demo_project, tmp_path):
    """demo_retina is a folder of two looms, each preprocessed by a job of its own. Rewriting
    one in place reruns that file's job (not its sibling's) and the aggregations; adding a
    file adds one job; removing one reruns only the aggregations."""
    folder = tmp_path / "retina"
    shutil.copytree(demo_project.root / "demo" / "demo_retina", folder)
    rows = [{"dataset": "retina_copy", "species": "mmusculus", "path": str(folder)}]
    project = Project(tmp_path / "project", rows, {**FAST, "train": {"enabled": False}})
    assert project.snakemake().returncode == 0
    assert project.planned_jobs() == {}
    results = project.results
    before = {
        f: digest(results / "shards" / "retina_copy" / f)
        for f in ("retina_batch1", "retina_batch2")
    }

    # Rewritten in place (same name, new content): that file's job and the aggregations.
    shutil.copy(
        demo_project.root / "demo" / "demo_retina" / "retina_batch1.loom",
        folder / "retina_batch2.loom",
    )
    jobs = project.planned_jobs()
    assert jobs.pop("preprocess") == 1 and jobs.pop("aggregate_dataset") == 1
    assert project.planned_wildcards("preprocess") == ["dataset=retina_copy, file=retina_batch2"]
    assert project.snakemake().returncode == 0
    assert digest(results / "shards" / "retina_copy" / "retina_batch1") == before["retina_batch1"]
    assert digest(results / "shards" / "retina_copy" / "retina_batch2") != before["retina_batch2"]
    provenance = json.loads((results / "provenance" / "retina_copy.json").read_text())
    checksums = {Path(i["file"]).name: i["blake3"] for i in provenance["inputs"]}
    assert checksums["retina_batch1.loom"] == checksums["retina_batch2.loom"]  # the new content

    # A file added: one new job; the other file's job does not rerun.
    shutil.copy(folder / "retina_batch1.loom", folder / "retina_batch3.loom")
    assert project.planned_wildcards("preprocess") == ["dataset=retina_copy, file=retina_batch3"]
    assert project.snakemake().returncode == 0
    # A file removed: no preprocessing at all, the aggregations rerun without it.
    (folder / "retina_batch3.loom").unlink()
    jobs = project.planned_jobs()
    assert "preprocess" not in jobs and jobs["aggregate_dataset"] == 1
    assert project.snakemake().returncode == 0
    manifest = json.loads((results / "shards" / "retina_copy" / "manifest.json").read_text())
    assert [s["shard"] for s in manifest["shards"]] == ["retina_batch1", "retina_batch2"]
    # and its outputs are gone: h5ads/ lists the dataset's current files only.
    assert sorted(p.name for p in (results / "data" / "retina_copy" / "h5ads").iterdir()) == [
        "retina_batch1.h5ad",
        "retina_batch2.h5ad",
    ]
    assert not (results / "shards" / "retina_copy" / "retina_batch3").exists()


def test_adding_datasets_keeps_every_earlier_validation_assignment(demo_project, tmp_path):
    """The default split holds out cells by their barcodes' hash (seed, dataset, barcode):
    datasets added to the sheet (one per species) bring their own held-out cells and leave
    every earlier assignment, and every earlier default split file, as it was."""
    before = demo_project.results
    after = tmp_path / "results"
    # A copy of the finished project (times kept, so only the added datasets' chains run).
    shutil.copytree(
        before, after, ignore=shutil.ignore_patterns("model_checkpoints", "report", "benchmarks")
    )
    root = demo_project.root
    added = [
        {"dataset": "demo_brain_copy", "species": "mmusculus", "path": str(root / "demo" / "demo_brain.h5ad")},
        {"dataset": "demo_pbmc_copy", "species": "hsapiens", "path": str(root / "demo" / "demo_pbmc_ids.h5ad")},
    ]  # fmt: skip
    config = demo_project.write([*demo_project.datasets, *added], FAST, name="-more")
    config.write_text(config.read_text().replace(str(before), str(after)))
    # `--until splits`, not the target holdout.parquet: Snakemake plans nothing for a target
    # that exists, even when inputs of its job are still to be made.
    result = demo_project.snakemake("--until", "splits", config=config)
    assert result.returncode == 0, result.stdout[-5000:]
    ran = parse_job_stats(result.stdout)
    assert ran["preprocess"] == 2 and ran["splits"] == 1, ran

    old, new = (pl.read_parquet(r / "manifests" / "holdout.parquet") for r in (before, after))
    earlier = new.filter(pl.col("dataset").is_in(old["dataset"].unique().implode()))
    assert earlier.sort(old.columns).equals(old.sort(old.columns))
    assert set(new["dataset"]) == set(old["dataset"]) | {a["dataset"] for a in added}
    assert all(new.filter(pl.col("dataset") == a["dataset"]).height > 0 for a in added)
    split_files = sorted(p.name for p in (before / "splits").glob("*.yaml"))
    assert len(split_files) == len(DEMO_DATASETS)
    for name in split_files:
        assert (after / "splits" / name).read_bytes() == (before / "splits" / name).read_bytes()
    assert all((after / "splits" / f"{a['dataset']}.yaml").is_file() for a in added)


def test_unsafe_dataset_name_fails_before_any_job(demo_project):
    bad = [
        *demo_project.datasets,
        {"dataset": "../escape", "species": "hsapiens", "path": "/x.h5ad"},
    ]
    result = demo_project.snakemake("-n", config=demo_project.write(bad, FAST, name="-unsafe"))
    assert result.returncode != 0
    assert "dataset name '../escape' is not a safe identifier" in result.stdout


def test_preprocessing_resources_follow_the_input_size(tmp_path):
    """A preprocessing job asks for memory and time by the size of its input: a 40 GiB file
    (sparse on disk: planning reads only names and sizes) gets more than a small one, which gets
    the floor."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    sizes = {"small": 2**20, "large": 40 * 2**30}
    rows = []
    for name, size in sizes.items():
        path = inputs / f"{name}.h5ad"
        with open(path, "wb") as handle:
            handle.truncate(size)
        rows.append({"dataset": name, "species": "hsapiens", "path": str(path)})
    project = Project(tmp_path / "project", rows, {**FAST, "train": {"enabled": False}})
    result = project.snakemake("-n")
    assert result.returncode == 0, result.stdout[-3000:]
    requested = {}
    for job in result.stdout.split("rule preprocess:")[1:]:
        dataset = re.search(r"wildcards: dataset=(\w+)", job).group(1)
        resources = dict(re.findall(r"(\w+)=([\w.]+)", re.search(r"resources: (.*)", job).group(1)))
        requested[dataset] = (int(resources["mem_mb"]), int(resources["runtime"]))
    (small_mem, small_minutes), (large_mem, large_minutes) = requested["small"], requested["large"]
    # 40 GiB more input: about 2 GB more memory (a few bytes per cell) and more time.
    assert 1_500 <= small_mem < 1_600 and small_minutes == 10
    assert large_mem - small_mem > 1_500 and large_minutes > 60


def test_lint_and_format_are_clean(demo_project):
    lint = demo_project.snakemake("--lint")
    assert lint.returncode == 0 and "Congratulations" in lint.stdout, lint.stdout
    fmt = run(
        [str(Path(shutil.which("snakefmt") or "snakefmt")), "--check", "Snakefile", "workflow"],
        cwd=REPO,
    )
    assert fmt.returncode == 0, fmt.stdout


@pytest.mark.parametrize("profile", ["profiles/local", "profiles/slurm"])
def test_profiles_plan_without_a_cluster(demo_project, profile):
    result = demo_project.snakemake("-n", "-F", profile=profile)
    assert result.returncode == 0, result.stdout[-3000:]
    jobs = parse_job_stats(result.stdout)
    assert set(jobs) >= PREP_RULES


def test_outputs_do_not_depend_on_other_datasets_or_order(demo_project, tmp_path):
    """Same input and config give the same bytes whatever else is in the run, in any order."""
    human = [d.name for d in DEMO_DATASETS if d.species == "hsapiens"]
    mouse = [d.name for d in DEMO_DATASETS if d.species == "mmusculus"]
    rows = list(reversed(demo_rows(tmp_path, human + mouse[:1])))
    other = Project(tmp_path, rows, {**FAST, "train": {"enabled": False}})
    result = other.snakemake()
    assert result.returncode == 0, result.stdout[-5000:]
    a, b = demo_project.results, other.results
    for name in human + mouse[:1]:
        assert digest(a / "shards" / name) == digest(b / "shards" / name), name
        assert digest(a / "stats" / "datasets" / f"{name}.parquet") == digest(
            b / "stats" / "datasets" / f"{name}.parquet"
        )
        for h5ad in (a / "data" / name / "h5ads").glob("*.h5ad"):
            assert digest(h5ad) == digest(b / "data" / name / "h5ads" / h5ad.name)
    vocab = Path("references/vocabulary/token_mappings_per_specie/hsapiens.csv")
    assert digest(a / vocab) == digest(b / vocab)

    # Adding the missing mouse dataset runs its chain and the mouse aggregations only ...
    no_training = {**FAST, "train": {"enabled": False}}
    jobs = other.planned_jobs(
        config=other.write(list(reversed(demo_rows(tmp_path))), no_training, name="-full")
    )
    jobs.pop("all")
    (added,) = [d for d in DEMO_DATASETS if d.name in mouse[1:]]
    assert jobs == {
        **{
            k: v
            for k, v in SPECIES_CHAIN.items()
            if k not in ("train", "report_training", "report_embeddings", "report_evaluation")
        },
        # one job per file of the added dataset (demo_retina is a folder of looms)
        "preprocess": len(list((tmp_path / "demo" / added.path).glob("*.loom"))),
    }
    result = other.snakemake(config=other.root / "config-full.yaml")
    assert result.returncode == 0, result.stdout[-5000:]
    # ... and then the mouse vocabulary matches the run that had all datasets from the start.
    mouse_vocab = Path("references/vocabulary/token_mappings_per_specie/mmusculus.csv")
    assert digest(a / mouse_vocab) == digest(b / mouse_vocab)


def test_bad_datasets_fail_alone_and_rerun_after_fixing(
    project_factory, tmp_path, shared_data_optional
):
    root = tmp_path / "bad"
    good = demo_rows(root, ["demo_pbmc_ids"])
    truncated = root / "inputs" / "truncated.h5ad"
    rows = [
        *good,
        {"dataset": "truncated", "species": "hsapiens", "path": str(truncated)},
        {"dataset": "cow", "species": "btaurus", "path": str(root / "demo" / "demo_pbmc_ids.h5ad")},
        {
            "dataset": "shallow",
            "species": "hsapiens",
            "path": str(root / "demo" / "demo_pbmc_ids.h5ad"),
            "min_genes": 100000,
        },
    ]
    if shared_data_optional:
        rows.append(
            {
                "dataset": "mixed",
                "species": "hsapiens",
                "path": str(shared_data_optional / "bad_cellxgene_example_invalid.h5ad"),
            }
        )
    root.mkdir()
    project = Project(root, rows, {**FAST, "train": {"enabled": False}})
    demo = project.snakemake(str(root / "demo" / "demo_pbmc_ids.h5ad"))
    assert demo.returncode == 0, demo.stdout[-3000:]
    truncated.parent.mkdir()
    data = (root / "demo" / "demo_pbmc_ids.h5ad").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])

    result = project.snakemake()
    assert result.returncode != 0
    expected = {
        "truncated": "cannot be read as h5ad",
        "cow": "species 'btaurus' has no gene reference",
        "shallow": "no cell passes QC",
        "mixed": "cells come from several organisms",
    }
    for name, problem in expected.items():
        if name == "mixed" and not shared_data_optional:
            continue
        (log_file,) = (project.results / "logs" / "preprocess" / name).glob("*.log")
        log = log_file.read_text()
        errors = [line for line in log.splitlines() if "error:" in line]
        assert (
            len(errors) == 1 and f"dataset '{name}', file '" in errors[0] and problem in errors[0]
        ), log
        assert not (project.results / "data" / name).exists()
        assert not (project.results / "qc" / name).exists()
        assert not (project.results / "stats" / "datasets" / f"{name}.parquet").exists()
    # The good dataset went through its own chain.
    assert (project.results / "data" / "demo_pbmc_ids" / "h5ads" / "demo_pbmc_ids.h5ad").is_file()
    assert (project.results / "shards" / "demo_pbmc_ids" / "manifest.json").is_file()

    # Fix the truncated file, drop the others: only what is missing runs.
    truncated.write_bytes(data)
    fixed = project.write([*good, rows[1]], {**FAST, "train": {"enabled": False}}, name="-fixed")
    jobs = project.planned_jobs(config=fixed)
    jobs.pop("all")
    assert jobs["preprocess"] == 1 and jobs["aggregate_dataset"] == 1
    result = project.snakemake(config=fixed)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.fixture
def shared_data_optional() -> Path | None:
    from conftest import SHARED_DATA

    return SHARED_DATA if (SHARED_DATA / "MANIFEST.md").is_file() else None


def test_real_datasets_run_through_the_workflow(project_factory, shared_data, tmp_path):
    rows = [
        {
            "dataset": "pbmc1k_10x",
            "species": "hsapiens",
            "path": str(shared_data / "human_pbmc1k_10x_cellranger6.h5"),
        },
        {
            "dataset": "pbmc5k_symbols",
            "species": "hsapiens",
            "path": str(shared_data / "human_pbmc5k_protein_v3_200cells.h5ad"),
        },
        {
            "dataset": "cxg_valid",
            "species": "hsapiens",
            "path": str(shared_data / "cellxgene_example_valid_2cells.h5ad"),
            "min_genes": 1,
            "min_counts": 1,
        },
        # 1,000 genes only: per-dataset QC thresholds to match.
        {
            "dataset": "e18_brain",
            "species": "mmusculus",
            "path": str(shared_data / "mouse_e18_brain_10k_cells_1000genes.h5ad"),
            "min_genes": 20,
            "min_counts": 40,
        },
        {
            "dataset": "sympathetic",
            "species": "mmusculus",
            "path": str(shared_data / "mouse_sympathetic_furlan2016.loom"),
        },
    ]
    # scConcept split files: validate on the 5k PBMCs, train on everything else.
    splits = shared_data_splits(tmp_path / "splits", rows, val="pbmc5k_symbols")
    project = project_factory(rows, {**FAST, "splits": splits})
    result = project.snakemake()
    assert result.returncode == 0, result.stdout[-5000:]
    manifest = pl.read_parquet(project.results / "manifests" / "shards.parquet")
    assert manifest.filter(pl.col("split") == "val")["dataset"].to_list() == ["pbmc5k_symbols"]
    metrics = pl.read_csv(project.results / "model_checkpoints" / "demo" / "logs" / "metrics.csv")
    val = metrics.filter(pl.col("val/loss").is_not_null()).sort("step")["val/loss"]
    assert val[-1] < val[0]  # trained on real data, validated on a held-out real dataset
    qc = {
        r["dataset"]: json.loads((project.results / "qc" / r["dataset"] / "qc.json").read_text())
        for r in rows
    }
    assert qc["cxg_valid"]["files"][0]["counts_source"] == "raw.X"
    pbmc1k = qc["pbmc1k_10x"]["files"][0]
    # 36,601 genes counted; the 10 antibody-capture features are left out, and counted as such.
    assert (pbmc1k["genes_in"], pbmc1k["genes_counted"]) == (36611, 36601)
    assert pbmc1k["features_left_out"] == {"Antibody Capture": 10}
    assert qc["e18_brain"]["cells_kept"] > 9000
    assert all(q["mapping_rate"] > 0.8 for q in qc.values())
    assert manifest["n_cells"].sum() == sum(q["cells_kept"] for q in qc.values())
    assert project.planned_jobs() == {}


def shared_data_splits(folder: Path, rows: list[dict[str, object]], val: str) -> dict[str, object]:
    """One scConcept split file per dataset (interpolated source_path); `val` is validation."""
    import yaml

    folder.mkdir()
    for row in rows:
        file = f"{Path(str(row['path'])).stem}.h5ad"
        section = "val" if row["dataset"] == val else "train"
        body = {
            "source_name": row["dataset"],
            "species": row["species"],
            "source_path": "${PATH.PROJECT_PATH}/data/${.source_name}/h5ads",
            "train": [file] if section == "train" else [],
            "val": [file] if section == "val" else [],
        }
        (folder / f"{row['dataset']}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    names = [str(r["dataset"]) for r in rows]
    return {"dir": str(folder), "train": names, "val": [val]}


# The README's examples meant to run on the demo: fenced blocks right after this marker.
DEMO_EXAMPLE = re.compile(r"<!-- demo-example -->\n```(\w+)\n(.*?)\n```", re.S)


@pytest.fixture(scope="module")
def readme_run(demo_project) -> dict[str, object]:
    """The README's demo examples run as written, in order, after the demo run: in a folder laid
    out like a clone (Snakefile, workflow/, profiles/) whose config/config.yaml is the demo
    project's, so that `results/` is its results. Returns the folder, the examples with their
    output, and the names the examples wrote into the folder."""
    examples = DEMO_EXAMPLE.findall((REPO / "README.md").read_text())
    assert {language for language, _ in examples} == {"bash", "python"}, examples
    root = demo_project.root
    for name in ("Snakefile", "workflow", "profiles"):
        (root / name).symlink_to(REPO / name)
    (root / "config").mkdir()
    shutil.copyfile(demo_project.config_path, root / "config" / "config.yaml")
    before = {p.name for p in root.iterdir()}
    # The environment's commands (snakemake, cellfoundry, python) first, as after activating it.
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran = []
    for language, body in examples:
        command = ["bash", "-euo", "pipefail", "-c", body]
        if language == "python":
            command = ["python", "-c", body]
        result = run(command, cwd=root, env=env, timeout=1800)
        assert result.returncode == 0, f"README example failed:\n{body}\n{result.stdout[-5000:]}"
        ran.append((body, result.stdout))
    written = sorted({p.name for p in root.iterdir()} - before)
    ignored = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "--no-index", *written],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return {"root": root, "ran": ran, "written": written, "ignored": ignored}


def test_readme_examples_run_as_written_on_the_demo(demo_project, readme_run):
    root, ran = readme_run["root"], dict(readme_run["ran"])
    # The plan after a complete run is empty; `prep` has nothing to do either.
    (plan,) = [out for body, out in ran.items() if " -n" in body]
    assert plan.count("Nothing to be done") == 2 and "Finished job" not in plan, plan[-3000:]
    # The other families' runs are what the later examples read.
    exported = {
        run: json.loads((root / "results" / "model_checkpoints" / run / "final" / "config.json").read_text())
        for run in ("geneformer", "sedd")
    }  # fmt: skip
    assert exported["geneformer"]["objective"] == "geneformer_mlm"
    assert exported["geneformer"]["model_type"] == "bert"
    assert exported["sedd"]["objective"] == "diffusion"
    embedded = ad.read_h5ad(root / "brain_embedded.h5ad")
    z = embedded.obsm["X_cellfoundry"]
    assert z.shape[0] == embedded.n_obs > 0 and np.isfinite(z).all()
    generated = ad.read_h5ad(root / "generated.h5ad")
    assert generated.n_obs == 100 and generated.uns["cellfoundry"]["species"] == "hsapiens"
    assert (root / "report.html").stat().st_size > 100_000
    # The default run is a binned-MLM model: sampling from it, or loading it as a BERT, is
    # refused in one line.
    refused = run(
        ["python", "-m", "cellfoundry", "sample", "--model", "results/model_checkpoints/demo/final",
         "--species", "hsapiens", "--out", "x.h5ad"],
        cwd=root,
    )  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stdout
    assert refused.stdout.strip().splitlines()[-1].startswith("cellfoundry sample: error:")
    from cellfoundry.errors import ModelFolderError
    from cellfoundry.train.export import load_bert

    with pytest.raises(ModelFolderError, match="not a BERT export"):
        load_bert(root / "results" / "model_checkpoints" / "demo" / "final")


def test_readme_outputs_are_ignored_by_git(readme_run):
    """What the README's examples write at the repository root does not show up in git."""
    if readme_run["ignored"].returncode == 128:
        pytest.skip(f"not a git checkout: {readme_run['ignored'].stderr.strip()}")
    assert {"report.html", "brain_embedded.h5ad", "generated.h5ad"} <= set(readme_run["written"])
    assert readme_run["ignored"].stdout.split() == readme_run["written"]


def test_readme_states_the_measured_job_count(tmp_path):
    """The quick start's job count is that of `make demo` from nothing: Snakemake's plan for
    the repository's own config and profile in a clone without results/ or resources/."""
    readme = (REPO / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start") : readme.index("## What lands where")]
    (stated,) = re.findall(r"in (\d+) jobs", quick_start)
    for name in ("Snakefile", "workflow", "profiles", "config"):
        (tmp_path / name).symlink_to(REPO / name)
    command = [sys.executable, "-m", "snakemake", "--profile", "profiles/local"]
    plan = run([*command, "-n", "--quiet", "rules"], cwd=tmp_path)
    assert plan.returncode == 0, plan.stdout[-3000:]
    planned = parse_job_stats(plan.stdout)
    assert planned["demo_corpus"] == 1 and planned["train"] == 1, planned
    assert sum(planned.values()) == int(stated), planned


@pytest.mark.browser
def test_report_renders_every_plot_in_a_browser(readme_run, tmp_path):
    """The report the README's command built from the demo run, clicked through in headless
    Chromium: every result of every category shows, tables list the datasets."""
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from browser import chromium, open_result

    report = readme_run["root"] / "report.html"
    assert "http://" not in report.read_text().split("<script", 1)[0]  # self-contained head
    seen: dict[str, int] = {}
    tables: dict[str, list[str]] = {}
    shown_before: set[str] = set()
    with chromium(tmp_path / "chromium") as browser:
        wait = WebDriverWait(browser, 60)
        for category in ("1. Quality control", "2. Corpus", "3. Training", "4. Cell embeddings"):
            browser.get(report.as_uri())
            wait.until(ec.element_to_be_clickable((By.LINK_TEXT, category))).click()
            eyes = (By.CSS_SELECTOR, 'a[iconname="eye"]')
            for i in range(len(wait.until(ec.presence_of_all_elements_located(eyes)))):
                shown = open_result(browser, i, shown_before)
                shown_before.add(shown)
                seen[category] = seen.get(category, 0) + 1
                if shown.startswith("iframe"):
                    browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
                    rows = wait.until(
                        ec.presence_of_all_elements_located((By.CSS_SELECTOR, "tbody tr"))
                    )
                    tables[category] = [r.text for r in rows]
                    browser.switch_to.default_content()
            browser.save_screenshot(str(tmp_path / f"{category[0]}.png"))
    labelled = ("demo_pbmc_ids", "demo_pbmc_symbols", "demo_brain", "demo_retina")
    assert seen == {
        "1. Quality control": len(DEMO_DATASETS),
        "2. Corpus": 1,
        "3. Training": 1,
        # Per labelled dataset: its UMAP and its metrics during training; one table.
        "4. Cell embeddings": 2 * len(labelled) + 1,
    }
    # The corpus page lists every dataset and both species; the embeddings the labelled ones.
    corpus = "\n".join(tables["2. Corpus"])
    assert all(d.name in corpus for d in DEMO_DATASETS) and "mmusculus" in corpus
    assert {row.split()[0] for row in tables["4. Cell embeddings"]} >= set(labelled)
    # The screenshot of the embeddings shows a picture, not an empty page.
    pixels = np.asarray(Image.open(tmp_path / "4.png").convert("L"), dtype=float)
    assert pixels.std() > 10


# Last: it retrains the demo project with other settings.
def test_interrupted_training_rule_resumes_when_rerun(demo_project):
    """Kill Snakemake (and its training job) after the first checkpoint; the rerun resumes."""
    import os
    import signal
    import subprocess
    import time

    longer = demo_project.write(
        demo_project.datasets,
        {**FAST, "train": {**FAST["train"], "max_steps": 100}},
        name="-longer",
    )
    run_dir = demo_project.results / "model_checkpoints" / "demo"
    process = subprocess.Popen(
        demo_project.command(config=longer), cwd=REPO, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 900
    marker = run_dir / "run.json"
    before = marker.read_text()

    def new_checkpoints() -> list[Path]:
        started = marker.stat().st_mtime_ns
        return [p for p in run_dir.glob("checkpoints/*.ckpt") if p.stat().st_mtime_ns > started]

    # Wait for a checkpoint of the longer run (it rewrites run.json when it starts).
    while not (marker.read_text() != before and new_checkpoints()):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved = max(checkpoint_step(p) for p in run_dir.glob("checkpoints/*.ckpt"))
    assert saved < 100

    # A killed Snakemake leaves its lock behind; the local profile reruns incomplete jobs.
    assert demo_project.snakemake("--unlock", config=longer).returncode == 0
    result = demo_project.snakemake(config=longer)
    assert result.returncode == 0, result.stdout[-4000:]
    log = (demo_project.results / "logs" / "train" / "demo.log").read_text()
    assert re.search(r"resuming from \S+/checkpoints/\S*step\d{7}\.ckpt", log), log[-3000:]
    first_step = int(re.search(r"step (\d+)/100", log).group(1))
    assert first_step > saved - 1  # continued, not from step 0
    assert json.loads((run_dir / "final" / "config.json").read_text())["steps"] == 100
