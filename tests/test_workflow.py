"""The workflow run for real by Snakemake: the demo corpus, the real datasets, incremental runs,
reproducibility and bad input failing alone."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import polars as pl
import pytest

from cellfoundry.demo import DEMO_DATASETS
from conftest import REPO, Project, parse_job_stats, run

pytestmark = pytest.mark.slow

PREP_RULES = {
    "preprocess",
    "shards",
    "gene_stats",
    "vocabulary",
    "panel_hvg",
    "splits",
    "shard_manifest",
}


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
    project = Project(root, demo_rows(root))
    result = project.snakemake()
    assert result.returncode == 0, result.stdout[-5000:]
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
        assert (results / "logs" / "preprocess" / f"{d.name}.log").is_file()
        assert (results / "benchmarks" / "preprocess" / f"{d.name}.tsv").is_file()
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


def test_complete_run_has_nothing_left_to_do(demo_project):
    assert demo_project.planned_jobs() == {}


def test_one_dataset_setting_reruns_only_its_chain(demo_project):
    rows = demo_project.datasets
    changed = [dict(r, min_genes=150) if r["dataset"] == "demo_brain" else r for r in rows]
    jobs = demo_project.planned_jobs(config=demo_project.write(changed, {}, name="-changed"))
    assert jobs.pop("all") == 1
    # demo_brain's own chain, and the mouse corpus aggregations; nothing of the other datasets.
    assert jobs == {
        "preprocess": 1,
        "shards": 1,
        "gene_stats": 1,
        "vocabulary": 1,
        "panel_hvg": 1,
        "splits": 1,
        "shard_manifest": 1,
    }
    config = demo_project.root / "config-changed.yaml"
    assert demo_project.planned_wildcards("preprocess", config=config) == ["dataset=demo_brain"]
    assert demo_project.planned_wildcards("gene_stats", config=config) == ["species=mmusculus"]


def test_adding_a_dataset_adds_only_its_jobs(demo_project):
    extra = {
        "dataset": "demo_brain_copy",
        "species": "mmusculus",
        "path": str(demo_project.root / "demo" / "demo_brain.h5ad"),
    }
    jobs = demo_project.planned_jobs(
        config=demo_project.write([*demo_project.datasets, extra], {}, name="-added")
    )
    jobs.pop("all")
    assert jobs == {
        "preprocess": 1,
        "shards": 1,
        "gene_stats": 1,
        "vocabulary": 1,
        "panel_hvg": 1,
        "splits": 1,
        "shard_manifest": 1,
    }
    assert demo_project.planned_wildcards(
        "shards", config=demo_project.root / "config-added.yaml"
    ) == ["dataset=demo_brain_copy"]


def test_unsafe_dataset_name_fails_before_any_job(demo_project):
    bad = [
        *demo_project.datasets,
        {"dataset": "../escape", "species": "hsapiens", "path": "/x.h5ad"},
    ]
    result = demo_project.snakemake("-n", config=demo_project.write(bad, {}, name="-unsafe"))
    assert result.returncode != 0
    assert "dataset name '../escape' is not a safe identifier" in result.stdout


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
    other = Project(tmp_path, rows)
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
    jobs = other.planned_jobs(
        config=other.write(list(reversed(demo_rows(tmp_path))), {}, name="-full")
    )
    jobs.pop("all")
    assert jobs == {
        "preprocess": 1,
        "shards": 1,
        "gene_stats": 1,
        "vocabulary": 1,
        "panel_hvg": 1,
        "splits": 1,
        "shard_manifest": 1,
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
    project = Project(root, rows)
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
        log = (project.results / "logs" / "preprocess" / f"{name}.log").read_text()
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
    fixed = project.write([*good, rows[1]], {}, name="-fixed")
    jobs = project.planned_jobs(config=fixed)
    jobs.pop("all")
    assert jobs["preprocess"] == 1 and jobs["shards"] == 1
    result = project.snakemake(config=fixed)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.fixture
def shared_data_optional() -> Path | None:
    from conftest import SHARED_DATA

    return SHARED_DATA if (SHARED_DATA / "MANIFEST.md").is_file() else None


def test_real_datasets_run_through_the_workflow(project_factory, shared_data):
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
    project = project_factory(rows)
    result = project.snakemake()
    assert result.returncode == 0, result.stdout[-5000:]
    qc = {
        r["dataset"]: json.loads((project.results / "qc" / r["dataset"] / "qc.json").read_text())
        for r in rows
    }
    assert qc["cxg_valid"]["files"][0]["counts_source"] == "raw.X"
    assert qc["pbmc1k_10x"]["files"][0]["genes_in"] == 36601  # antibody capture dropped
    assert qc["e18_brain"]["cells_kept"] > 9000
    assert all(q["mapping_rate"] > 0.8 for q in qc.values())
    manifest = pl.read_parquet(project.results / "manifests" / "shards.parquet")
    assert manifest["n_cells"].sum() == sum(q["cells_kept"] for q in qc.values())
    assert project.planned_jobs() == {}
