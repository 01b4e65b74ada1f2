"""`snakemake --profile profiles/slurm` against a real single-node Slurm cluster.

The cluster (tests/slurm_cluster.py) runs Debian's slurmctld, slurmd and munge with the
partitions the profile names and two fake GPUs. The profile is used as shipped; only the first
status check comes sooner (a command-line flag), so that the tests take minutes, not tens.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellfoundry.demo import DEMO_DATASETS
from conftest import REPO, SMALL_PROJECT, Project

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROFILE = "profiles/slurm"
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "2")
# A small corpus and a tiny model: the point is the cluster, not the science.
CONFIG = SMALL_PROJECT


def cluster_env(cluster) -> dict[str, str]:
    """The cluster's environment, with this interpreter's bin first on PATH: the rules call
    `python -m cellfoundry` and the launcher `srun ... python`."""
    env = cluster.env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def demo_rows(root: Path, names: list[str] | None = None) -> list[dict[str, object]]:
    rows = [
        {"dataset": d.name, "species": d.species, "path": str(root / "demo" / d.path)}
        for d in DEMO_DATASETS
    ]
    return [r for r in rows if names is None or r["dataset"] in names]


def jobs_by_rule(cluster) -> dict[str, list[dict[str, str]]]:
    """Every job the cluster still remembers (MinJobAge), grouped by Snakemake rule (its comment)."""
    out: dict[str, list[dict[str, str]]] = {}
    for job in cluster.squeue():
        details = cluster.job(job["id"])
        comment = details.get("Comment", "")  # the plugin's: rule_<rule>[_wildcards_<values>]
        if comment.startswith("rule_"):
            out.setdefault(comment.removeprefix("rule_").split("_wildcards")[0], []).append(details)
    return out


@pytest.fixture(scope="module")
def cluster_project(slurm_cluster, tmp_path_factory) -> Project:
    """The demo pipeline run once through the Slurm profile."""
    slurm_cluster.cancel_all_jobs()
    slurm_cluster.wait_until_idle()
    root = tmp_path_factory.mktemp("slurm-demo")
    project = Project(root, demo_rows(root), CONFIG)
    result = project.snakemake(
        *FAST_POLLING, profile=PROFILE, env=cluster_env(slurm_cluster), timeout=2400
    )
    assert result.returncode == 0, result.stdout[-6000:]
    return project


def test_demo_runs_through_slurm_and_trains_on_two_ranks(cluster_project, slurm_cluster):
    results = cluster_project.results
    assert (results / "model_checkpoints" / "demo" / "final" / "model.safetensors").is_file()
    log = (results / "logs" / "train" / "demo.log").read_text()
    # Lightning saw both srun tasks as one DDP world.
    assert "rank 0 of world size 2 (1 node(s) x 2 device(s))" in log
    assert "rank 1 of world size 2 (1 node(s) x 2 device(s))" in log
    jobs = jobs_by_rule(slurm_cluster)
    # Data preparation: ordinary CPU jobs with the profile's default resources.
    for job in jobs["preprocess"]:
        assert job["Partition"] == "cpu"
        assert job["NumCPUs"] == "2"
        assert job["TimeLimit"] == "02:00:00"
        assert job["MinMemoryNode"] == "8000M"
        assert job["JobState"] == "COMPLETED"
    assert len(jobs["preprocess"]) == len(DEMO_DATASETS)
    # Training: one allocation, one task per (fake) GPU, the preemption signal armed.
    (train,) = jobs["train"]
    assert train["Partition"] == "gpu"
    assert train["NumTasks"] == "2"
    assert train["TresPerNode"] == "gres:gpu:2"
    assert train["JobState"] == "COMPLETED"


def test_preempted_training_requeues_and_resumes(cluster_project, slurm_cluster):
    """SIGUSR1 (what --signal=SIGUSR1@N sends before the time limit) makes Lightning save an HPC
    checkpoint and requeue the job; the requeued job resumes from it and Snakemake succeeds."""
    longer = cluster_project.write(
        cluster_project.datasets,
        {**CONFIG, "train": {**CONFIG["train"], "max_steps": 300}},
        name="-preempt",
    )
    command = cluster_project.command(*FAST_POLLING, profile=PROFILE, config=longer)
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=cluster_env(slurm_cluster),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    log = cluster_project.results / "logs" / "train" / "demo.log"
    deadline = time.time() + 900
    train_job = None
    while train_job is None:
        assert process.poll() is None, process.stdout.read()[-4000:]
        assert time.time() < deadline, "training never started"
        text = log.read_text() if log.is_file() else ""
        if re.search(r"step \d+/300", text):
            running = [
                j
                for j in slurm_cluster.squeue()
                if j["partition"] == "gpu" and j["state"] == "RUNNING"
            ]
            train_job = running[0]["id"] if running else None
        time.sleep(1)
    slurm_cluster.run("scancel", "--signal=USR1", train_job)
    output, _ = process.communicate(timeout=1200)
    assert process.returncode == 0, output[-6000:]
    job = slurm_cluster.job(train_job)
    assert job["Restarts"] == "1" and job["JobState"] == "COMPLETED"
    run_dir = cluster_project.results / "model_checkpoints" / "demo"
    assert list(run_dir.glob("hpc_ckpt_*.ckpt")), "Lightning saved no HPC checkpoint"
    second_attempt = log.read_text()  # Snakemake rewrites the log when the requeued job starts
    resumed = re.search(r"resuming from (\S+hpc_ckpt_\d+\.ckpt)", second_attempt)
    assert resumed, second_attempt[-3000:]
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["steps"] == 300
    first_step_after_resume = int(re.search(r"step (\d+)/300", second_attempt).group(1))
    assert first_step_after_resume > 5  # did not start again from step 0


def test_bad_dataset_fails_alone_on_the_cluster(slurm_cluster, tmp_path):
    root = tmp_path / "bad"
    rows = demo_rows(root, ["demo_pbmc_ids", "demo_brain"])
    truncated = root / "inputs" / "broken.h5ad"
    rows.append({"dataset": "broken", "species": "hsapiens", "path": str(truncated)})
    root.mkdir()
    project = Project(root, rows, {**CONFIG, "train": {"enabled": False}})
    env = cluster_env(slurm_cluster)
    # The demo files first (a local run), then break one copy.
    demo = project.snakemake(*[r["path"] for r in rows[:2]])
    assert demo.returncode == 0, demo.stdout[-3000:]
    truncated.parent.mkdir()
    good_bytes = Path(rows[0]["path"]).read_bytes()
    truncated.write_bytes(good_bytes[: len(good_bytes) // 3])

    failed = project.snakemake(*FAST_POLLING, profile=PROFILE, env=env, timeout=2400)
    assert failed.returncode != 0
    error = (project.results / "logs" / "preprocess" / "broken.log").read_text()
    assert "dataset 'broken', file '" in error and "cannot be read as h5ad" in error
    assert not (project.results / "data" / "broken").exists()
    # The other datasets finished their own chains, and the mouse corpus is complete.
    for name in ("demo_pbmc_ids", "demo_brain"):
        assert (project.results / "shards" / name / "manifest.json").is_file()
    assert (
        project.results
        / "references"
        / "vocabulary"
        / "token_mappings_per_specie"
        / "mmusculus.csv"
    ).is_file()

    truncated.write_bytes(good_bytes)
    planned = project.planned_wildcards("preprocess")
    assert planned == ["dataset=broken"]
    fixed = project.snakemake(*FAST_POLLING, profile=PROFILE, env=env, timeout=2400)
    assert fixed.returncode == 0, fixed.stdout[-6000:]
    assert (project.results / "manifests" / "shards.parquet").is_file()


def test_cluster_offers_its_cpus_and_fake_gpus(slurm_cluster):
    result = slurm_cluster.run(
        "srun", "--partition=gpu", "--ntasks=1", "--cpus-per-task=6", "--gres=gpu:2",
        "bash", "-c", "echo $SLURM_JOB_ID $CUDA_VISIBLE_DEVICES $SLURM_CPUS_PER_TASK",
    )  # fmt: skip
    job_id, gpus, cpus = result.stdout.split()
    assert (gpus, cpus) == ("0,1", "6")
    assert slurm_cluster.wait_for_job(job_id, ("COMPLETED",)) == "COMPLETED"
