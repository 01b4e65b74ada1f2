"""Shared fixtures: the repository, the real datasets in ../shared/data, tiny AnnData files and
a helper that runs Snakemake for real in a scratch project."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from cellfoundry.reference import GeneReference, load_bundled

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# A tiny model trained briefly: tests check the pipeline, not the science.
TINY_TRAIN = {
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "max_len": 64},
    "batch_size": 8,
    "max_steps": 30,
    "val_every_n_steps": 10,
    "val_batches": 2,
    "checkpoint_every_n_steps": 10,
    "log_every_n_steps": 5,
    "optimizer": {"warmup_steps": 5, "lr": 0.003},
}
# A small project: a small demo corpus, small gene embeddings and panels, the tiny model.
SMALL_PROJECT = {
    "demo": {"n_cells": 120},
    "embeddings": {"coexpression": {"method": "coexpression", "dim": 16}},
    "panels": {"hvg": {"n_top_genes": 200}},
    "train": TINY_TRAIN,
}


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the repository; tests using them skip when absent."""
    if not (SHARED_DATA / "MANIFEST.md").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def human() -> GeneReference:
    return load_bundled("hsapiens")


@pytest.fixture(scope="session")
def mouse() -> GeneReference:
    return load_bundled("mmusculus")


def protein_coding(reference: GeneReference, n: int, offset: int = 0) -> pd.DataFrame:
    """`n` protein-coding genes of a reference (gene_id, gene_name), in ID order."""
    table = reference.table.filter(reference.table["gene_type"] == "protein_coding")
    return pd.DataFrame(
        table.slice(offset, n).select("gene_id", "gene_name").to_dict(as_series=False)
    )


def count_matrix(
    n_cells: int, n_genes: int, *, seed: int = 0, depth: float = 2_000.0
) -> sp.csr_matrix:
    """Negative-binomial-like integer counts with two cell groups."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, size=n_genes)
    base /= base.sum()
    groups = rng.integers(0, 2, size=n_cells)
    shift = np.ones((2, n_genes))
    shift[1, : n_genes // 10] = 8.0
    mu = base[None, :] * shift[groups] * rng.lognormal(np.log(depth), 0.3, size=(n_cells, 1))
    counts = rng.poisson(rng.gamma(2.0, mu / 2.0))
    return sp.csr_matrix(counts.astype(np.float32))


@pytest.fixture
def make_adata(human: GeneReference) -> Callable[..., ad.AnnData]:
    """Tiny human AnnData with integer counts in X, Ensembl IDs and a mitochondrial gene."""

    def make(
        n_cells: int = 60, n_genes: int = 300, *, seed: int = 0, depth: float = 2_000.0
    ) -> ad.AnnData:
        genes = protein_coding(human, n_genes - 1)
        mito = pd.DataFrame(
            human.table.filter(human.table["gene_name"] == "MT-CO1").to_dict(as_series=False)
        )
        genes = pd.concat([genes, mito[["gene_id", "gene_name"]]], ignore_index=True)
        X = count_matrix(n_cells, n_genes, seed=seed, depth=depth)
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical(np.where(np.arange(n_cells) % 2, "B cell", "T cell"))},
            index=[f"cell{i}" for i in range(n_cells)],
        )
        var = pd.DataFrame(
            {"gene_name": genes["gene_name"].to_numpy()}, index=genes["gene_id"].to_numpy()
        )
        return ad.AnnData(X=X, obs=obs, var=var)

    return make


def run(
    cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: int = 1200
) -> subprocess.CompletedProcess:
    """Run a command, returning its result (stdout and stderr together)."""
    return subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        check=False,
    )


class Project:
    """A scratch project: its own config and dataset sheet, Snakemake run from the repository."""

    def __init__(
        self, root: Path, datasets: list[dict[str, object]], config: dict | None = None
    ) -> None:
        self.root = root
        self.results = root / "results"
        self.sheet = root / "datasets.tsv"
        self.config_path = root / "config.yaml"
        root.mkdir(parents=True, exist_ok=True)
        self.write(datasets, config or {})

    def write(self, datasets: list[dict[str, object]], config: dict, name: str = "") -> Path:
        """Write a sheet and a config (a named variant leaves the project's own untouched)."""
        sheet = self.root / f"datasets{name}.tsv"
        config_path = self.root / f"config{name}.yaml"
        pd.DataFrame(datasets).to_csv(sheet, sep="\t", index=False)
        body = {
            "project_path": str(self.results),
            "datasets": str(sheet),
            **config,
            "demo": {"path": str(self.root / "demo"), **config.get("demo", {})},
        }
        config_path.write_text(yaml.safe_dump(body, sort_keys=False))
        if not name:
            self.datasets, self.config = datasets, config
        return config_path

    def command(
        self, *args: str, profile: str = "profiles/local", config: Path | None = None
    ) -> list[str]:
        """The Snakemake command line for this project (run from the repository)."""
        config_file = str(config or self.config_path)
        return [
            sys.executable,
            "-m",
            "snakemake",
            "--profile",
            profile,
            "--configfile",
            config_file,
            "--cores",
            "2",
            *args,
        ]

    def snakemake(
        self,
        *args: str,
        profile: str = "profiles/local",
        config: Path | None = None,
        timeout: int = 1800,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        return run(
            self.command(*args, profile=profile, config=config), cwd=REPO, env=env, timeout=timeout
        )

    def planned_jobs(self, *args: str, config: Path | None = None) -> dict[str, int]:
        """Jobs a dry run would execute, by rule (the 'Job stats' table)."""
        result = self.snakemake("-n", "--quiet", "rules", *args, config=config)
        assert result.returncode == 0, result.stdout
        return parse_job_stats(result.stdout)

    def planned_wildcards(self, rule: str, *args: str, config: Path | None = None) -> list[str]:
        """Wildcards of the jobs of `rule` that a dry run would execute."""
        result = self.snakemake("-n", *args, config=config)
        assert result.returncode == 0, result.stdout
        found, current = [], None
        for line in result.stdout.splitlines():
            stripped = line.strip()
            if stripped.startswith(("rule ", "localrule ")):
                current = stripped.split()[1].rstrip(":")
            elif current == rule and stripped.startswith("wildcards:"):
                found.append(stripped.removeprefix("wildcards:").strip())
        return sorted(found)


def parse_job_stats(output: str) -> dict[str, int]:
    jobs: dict[str, int] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("job") and "count" in line:
            for row in lines[i + 2 :]:
                parts = row.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    break
                if parts[0] != "total":
                    jobs[parts[0]] = int(parts[1])
            break
    return jobs


@pytest.fixture
def project_factory(tmp_path: Path) -> Callable[..., Project]:
    def make(
        datasets: list[dict[str, object]], config: dict | None = None, name: str = "project"
    ) -> Project:
        root = tmp_path / name
        root.mkdir()
        return Project(root, datasets, config)

    return make


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real Slurm (Debian's packages) with the partitions the Slurm profiles name (cpu, gpu)
    and two fake GPUs per node; skips when Slurm or root is missing.

    Two nodes, each a slurmd in a network and UTS namespace of its own, where namespaces can be
    made; else one node (this host), with the reason in `one_node_reason`."""
    from slurm_cluster import NamespaceError, SlurmCluster, available

    if not available():
        pytest.skip("needs root and Slurm (bash .ci/install_slurm.sh)")
    # More CPUs and memory than the machine has: the profiles' requests must be schedulable.
    options = {"cpus": 32, "gpus": 2, "memory_mb": 256_000, "partitions": ("cpu", "gpu")}
    try:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, **options).start()
        cluster.one_node_reason = ""
    except NamespaceError as error:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), **options).start()
        cluster.one_node_reason = str(error)
    with cluster:
        yield cluster


def prepare_dataset(
    project: Path, demo_root: Path, name: str, config: dict, *, n_bins: int | None = None
) -> None:
    """Preprocess a demo dataset's files and aggregate them into `project`, by the command-line
    stages (`preprocess` per file, then `aggregate`), as the workflow does; `n_bins` overrides
    the config's value bins of the shards."""
    import json

    from cellfoundry.cli import main
    from cellfoundry.demo import DEMO_DATASETS
    from cellfoundry.sources import dataset_sources

    (d,) = [d for d in DEMO_DATASETS if d.name == name]
    settings = json.dumps(config["preprocess"])
    n_bins = config["shards"]["n_bins"] if n_bins is None else n_bins
    reference = str(project / "references" / "genes" / f"{d.species}.parquet")
    files = [s.name for s in dataset_sources(name, demo_root / d.path).files]
    per_file = {
        key: [str(project / pattern.format(name=name, file=f)) for f in files]
        for key, pattern in {
            "h5ad": "data/{name}/h5ads/{file}.h5ad",
            "shard": "shards/{name}/{file}",
            "gene-stats": "stats/files/{name}/{file}.parquet",
            "qc": "qc/{name}/files/{file}.json",
            "cells": "qc/{name}/files/{file}.cells.parquet",
        }.items()
    }
    for i, file in enumerate(files):
        main(
            [
                "preprocess",
                "--dataset",
                name,
                "--file",
                file,
                "--species",
                d.species,
                "--input",
                str(demo_root / d.path),
                f"--reference={reference}",
                "--settings",
                settings,
                "--n-bins",
                str(n_bins),
                "--tie-break",
                config["shards"]["tie_break"],
                "--seed",
                str(config["seed"]),
                "--exact-max-cells",
                str(config["gene_stats"]["exact_max_cells"]),
                *[arg for key, paths in per_file.items() for arg in (f"--{key}", paths[i])],
            ]
        )
    main(
        [
            "aggregate",
            "--dataset",
            name,
            "--species",
            d.species,
            "--input",
            str(demo_root / d.path),
            "--settings",
            settings,
            "--exact-max-cells",
            str(config["gene_stats"]["exact_max_cells"]),
            f"--reference-source={reference}",
            "--file-qc",
            *per_file["qc"],
            "--file-stats",
            *per_file["gene-stats"],
            "--shards",
            *per_file["shard"],
            "--gene-stats",
            str(project / "stats" / "datasets" / f"{name}.parquet"),
            "--qc",
            str(project / "qc" / name / "qc.json"),
            "--qc-plot",
            str(project / "qc" / name / "qc.png"),
            "--provenance",
            str(project / "provenance" / f"{name}.json"),
            "--shard-manifest",
            str(project / "shards" / name / "manifest.json"),
        ]
    )


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, object]:
    """A small prepared corpus (simulated demo, 120 cells per dataset), made by the command-line
    stages in this process: shard manifest, token mappings, gene summaries, gene embeddings."""
    import json

    from cellfoundry.cli import main
    from cellfoundry.config import validate_config
    from cellfoundry.demo import DEMO_DATASETS, write_demo_corpus

    root = tmp_path_factory.mktemp("tiny")
    project = root / "project"
    write_demo_corpus(root / "demo", seed=0, n_cells=120)
    names = ["demo_pbmc_ids", "demo_pbmc_10x", "demo_brain", "demo_retina"]
    datasets = {d.name: d for d in DEMO_DATASETS if d.name in names}
    config = validate_config({})
    species = sorted({d.species for d in datasets.values()})
    for species_name in species:
        main(
            [
                "reference",
                "--species",
                species_name,
                "--out",
                str(project / "references" / "genes" / f"{species_name}.parquet"),
            ]
        )
    for name in datasets:
        prepare_dataset(project, root / "demo", name, config)
    token_mappings, summaries = {}, {}
    for species_name in species:
        stats = [
            str(project / "stats" / "datasets" / f"{n}.parquet")
            for n, d in datasets.items()
            if d.species == species_name
        ]
        summaries[species_name] = project / "stats" / "species" / f"{species_name}.summary.parquet"
        main(
            [
                "gene-stats",
                "--species",
                species_name,
                "--inputs",
                *stats,
                "--exact-max-cells",
                str(config["gene_stats"]["exact_max_cells"]),
                "--out",
                str(project / "stats" / "species" / f"{species_name}.parquet"),
                "--summary",
                str(summaries[species_name]),
            ]
        )
        token_mappings[species_name] = (
            project
            / "references"
            / "vocabulary"
            / "token_mappings_per_specie"
            / f"{species_name}.csv"
        )
        main(
            [
                "vocabulary",
                "--species",
                species_name,
                "--stats",
                str(project / "stats" / "species" / f"{species_name}.parquet"),
                "--reference",
                str(project / "references" / "genes" / f"{species_name}.parquet"),
                "--min-cells",
                "3",
                "--out",
                str(token_mappings[species_name]),
            ]
        )
    panels = {}
    for species_name in species:
        panels[species_name] = project / "panels" / species_name / "hvg.csv"
        hvg = json.dumps({"n_top_genes": 200, "n_bins": 20})
        main(
            [
                "panel",
                "--species",
                species_name,
                "--name",
                "hvg",
                "--token-mapping",
                str(token_mappings[species_name]),
                "--summary",
                str(summaries[species_name]),
                "--settings",
                hvg,
                "--out",
                str(panels[species_name]),
                "--report",
                str(project / "qc" / "panels" / f"{species_name}.json"),
            ]
        )
    manifests = [str(project / "shards" / n / "manifest.json") for n in datasets]
    main(
        [
            "splits",
            "--settings",
            json.dumps(config["splits"]),
            "--qc",
            *[str(project / "qc" / n / "qc.json") for n in datasets],
            "--manifests",
            *manifests,
            "--project-path",
            str(project),
            "--out",
            str(project / "manifests" / "splits.parquet"),
            "--holdout",
            str(project / "manifests" / "holdout.parquet"),
            "--split-dir",
            str(project / "splits"),
        ]
    )
    manifest = project / "manifests" / "shards.parquet"
    main(
        [
            "shard-manifest",
            "--splits",
            str(project / "manifests" / "splits.parquet"),
            "--holdout",
            str(project / "manifests" / "holdout.parquet"),
            "--manifests",
            *manifests,
            "--out",
            str(manifest),
        ]
    )
    embeddings = {}
    for species_name in species:
        embeddings[species_name] = (
            project / "references" / "embeddings" / "coexpression" / f"{species_name}.csv"
        )
        main(
            [
                "embeddings",
                "--name",
                "coexpression",
                "--species",
                species_name,
                "--token-mapping",
                str(token_mappings[species_name]),
                "--shard-manifests",
                *[
                    str(project / "shards" / n / "manifest.json")
                    for n, d in datasets.items()
                    if d.species == species_name
                ],
                "--settings",
                json.dumps({"method": "coexpression", "dim": 16}),
                "--out",
                str(embeddings[species_name]),
                "--report",
                str(project / "qc" / "embeddings" / f"{species_name}.json"),
            ]
        )
    return {
        "project": project,
        "manifest": manifest,
        "token_mappings": token_mappings,
        "summaries": summaries,
        "embeddings": embeddings,
        "datasets": datasets,
        "panels": panels,
        "demo": root / "demo",
        "config": config,
    }
