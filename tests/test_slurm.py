"""`snakemake --profile profiles/slurm` and `profiles/slurm-multinode` against a real Slurm.

The cluster (tests/slurm_cluster.py) runs Debian's slurmctld, munge and two slurmd, each in a
network and UTS namespace of its own (nodes cfnode1 and cfnode2 on a private bridge), with the
partitions the profiles name and two fake GPUs per node; where namespaces cannot be made it is
one node and the multi-node tests skip. `profiles/slurm` is used as shipped;
`profiles/slurm-multinode` with its SITE keys set for this cluster (2 nodes x 2 GPUs). Only the
first status check comes sooner (a command-line flag), so that the tests take minutes, not tens.
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
import torch
import yaml
from safetensors.torch import load_file

from cellfoundry.demo import DEMO_DATASETS
from conftest import REPO, SMALL_PROJECT, TINY_TRAIN, Project

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROFILE = "profiles/slurm"
FAST_POLLING = ("--slurm-init-seconds-before-status-checks", "2")
# A small corpus and a tiny model: the point is the cluster, not the science.
CONFIG = SMALL_PROJECT
# Multi-node: 2 nodes x 2 tasks; each rank takes batch_size cells of a global batch of
# TINY_TRAIN's batch_size, so the one-process reference trains on the same global batches.
NODES, TASKS_PER_NODE = 2, 2
WORLD = NODES * TASKS_PER_NODE


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


def train_settings(**changes) -> dict[str, object]:
    return {**CONFIG, "train": {**CONFIG["train"], **changes}}


def jobs_by_rule(cluster, after: int = 0) -> dict[str, list[dict[str, str]]]:
    """Every job the cluster still remembers (MinJobAge) with an ID above `after`, grouped by
    Snakemake rule (its comment; a group job's is `rule_<group>_<rule>`)."""
    out: dict[str, list[dict[str, str]]] = {}
    for job in cluster.squeue():
        if int(job["id"]) <= after:
            continue
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
    # Data preparation: the many small jobs share Slurm jobs (the profile's groups), CPU jobs
    # within the pool the profile gives a group job.
    profile = yaml.safe_load((REPO / PROFILE / "config.yaml").read_text())
    pool = dict(entry.split("=") for entry in profile["resources"])
    components = dict(entry.split("=") for entry in profile["group-components"])
    n_files = len(list((results / "stats" / "files").glob("*/*.parquet")))
    assert n_files > len(DEMO_DATASETS)  # a folder dataset brings several files
    groups = {  # group: (its key in jobs_by_rule, members)
        "preprocess_files": ("preprocess_files_preprocess", n_files),
        "aggregate_datasets": ("aggregate_datasets_aggregate_dataset", len(DEMO_DATASETS)),
    }
    for group, (key, members) in groups.items():
        grouped = jobs[key]
        assert len(grouped) == -(-members // int(components[group]))
        for job in grouped:
            assert job["Partition"] == "cpu" and job["JobState"] == "COMPLETED"
            assert 1 <= int(job["NumCPUs"]) <= int(pool["cpus_per_task"])
            assert int(job["MinMemoryNode"].removesuffix("M")) <= int(pool["mem_mb"])
    # An ungrouped preparation job keeps the profile's default resources.
    (reference, *_) = jobs["reference"]
    assert (reference["NumCPUs"], reference["TimeLimit"]) == ("2", "02:00:00")
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


# -- multi-node ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes(slurm_cluster):
    if len(slurm_cluster.nodes) < NODES:
        pytest.skip(f"the test cluster has one node: {slurm_cluster.one_node_reason}")
    return slurm_cluster


@pytest.fixture(scope="module")
def multinode_profile(tmp_path_factory) -> Path:
    """profiles/slurm-multinode with the SITE keys of the training allocation set for the test
    cluster, 2 nodes x 2 fake GPUs (the shipped 2 x 4 does not fit); all else as shipped."""
    shipped = yaml.safe_load((REPO / "profiles" / "slurm-multinode" / "config.yaml").read_text())
    train = shipped["set-resources"]["train"]
    assert train["nodes"] == train["num_nodes"] == NODES
    assert f"--nodes={NODES} " in train["launcher"]
    train |= {
        "tasks_per_node": TASKS_PER_NODE,
        "devices": TASKS_PER_NODE,
        "gres": f"gpu:{TASKS_PER_NODE}",
        "launcher": re.sub(
            r"--ntasks-per-node=\d+", f"--ntasks-per-node={TASKS_PER_NODE}", train["launcher"]
        ),
    }
    profile = tmp_path_factory.mktemp("profile") / "slurm-multinode"
    profile.mkdir()
    (profile / "config.yaml").write_text(yaml.safe_dump(shipped, sort_keys=False))
    return profile


def rank_lines(log: str) -> dict[str, set]:
    """Who ran where and who finished, from a training log (all ranks of all nodes write it)."""
    started = re.findall(
        rf"rank (\d+) of world size {WORLD} \({NODES} node\(s\) x {TASKS_PER_NODE} device\(s\)\), "
        r"node rank (\d+) on (\S+),",
        log,
    )
    finished = re.findall(rf"rank (\d+) of world size {WORLD} finished at step (\d+)", log)
    return {
        "ranks": {int(r) for r, _, _ in started},
        "node_ranks": {int(n) for _, n, _ in started},
        "placement": {int(r): (int(n), host) for r, n, host in started},
        "finished": {(int(r), int(step)) for r, step in finished},
    }


# Slurm's default (block) distribution: ranks 0 and 1 on the first node, 2 and 3 on the second.
PLACEMENT = {0: (0, "cfnode1"), 1: (0, "cfnode1"), 2: (1, "cfnode2"), 3: (1, "cfnode2")}


@pytest.fixture(scope="module")
def two_node_run(two_nodes, cluster_project, multinode_profile) -> dict[str, object]:
    """The training rule through profiles/slurm-multinode on the demo corpus, 2 nodes x 2 ranks,
    preempted once: SIGUSR1 (what `--signal=SIGUSR1@N` sends before the time limit) as soon as
    all four ranks listen for it. Meanwhile, the same rule on this machine (profiles/local) in
    one process, on the same global batches: 2 cells per rank x 4 ranks against 8 in one.

    `two_nodes` comes first: on one node the tests skip before the demo runs."""
    steps = {
        "max_steps": 12,
        "val_every_n_steps": 100,
        "optimizer": {"warmup_steps": 1, "lr": 0.003},
        # The binned MLM: in float32 it matches one process within the tolerance below; the
        # shipped `small` preset's centred contrastive loss differs by ~2e-5 (README).
        "objective": "binned_mlm",
    }
    global_batch = TINY_TRAIN["batch_size"]
    project, results = cluster_project, cluster_project.results
    multi = project.write(
        project.datasets,
        train_settings(run="multinode", batch_size=global_batch // WORLD, **steps),
        name="-multinode",
    )
    single = project.write(
        project.datasets,
        train_settings(run="single", batch_size=global_batch, **steps),
        name="-single",
    )
    model = results / "model_checkpoints" / "multinode" / "final" / "model.safetensors"
    reference = results / "model_checkpoints" / "single" / "final" / "model.safetensors"
    log = results / "logs" / "train" / "multinode.log"
    local_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    commands = {
        "multinode": (
            project.command(
                *FAST_POLLING, str(model), profile=str(multinode_profile), config=multi
            ),
            cluster_env(two_nodes),
        ),
        "single": (project.command(str(reference), config=single), local_env),
    }
    processes = {}
    for name, (command, env) in commands.items():
        # Output to a file: a pipe nobody reads while the test waits could fill and block.
        with open(project.root / f"{name}.out", "w") as out:
            processes[name] = subprocess.Popen(
                command, cwd=REPO, env=env, text=True, stdout=out, stderr=out
            )

    def output(name: str) -> str:
        return (project.root / f"{name}.out").read_text()[-6000:]

    deadline = time.time() + 900
    first_attempt = ""
    try:
        # SlurmRequeue's handler is in place before a rank logs its rank line.
        while len(rank_lines(first_attempt)["ranks"]) < WORLD:
            assert processes["multinode"].poll() is None, output("multinode")
            assert time.time() < deadline, f"the ranks never started\n{first_attempt[-3000:]}"
            first_attempt = log.read_text() if log.is_file() else ""
            time.sleep(0.2)
        running = [j for j in two_nodes.squeue(all_states=False) if j["partition"] == "gpu"]
        assert [j["state"] for j in running] == ["RUNNING"], running
        job_id = running[0]["id"]
        two_nodes.run("scancel", "--signal=USR1", job_id)
        # The first attempt's log, until the requeued job's jobstep deletes it.
        while "on Slurm's signal; requeue of job" not in first_attempt:
            assert processes["multinode"].poll() is None, output("multinode")
            assert time.time() < deadline, f"no requeue\n{first_attempt[-3000:]}"
            text = log.read_text() if log.is_file() else ""
            first_attempt = text if len(text) >= len(first_attempt) else first_attempt
            time.sleep(0.2)
        for name, process in processes.items():
            process.wait(timeout=max(1, deadline - time.time()))
            assert process.returncode == 0, output(name)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    return {
        "job": two_nodes.job(job_id),
        "job_id": job_id,
        "first_attempt": first_attempt,
        "second_attempt": log.read_text(),
        "single_log": (results / "logs" / "train" / "single.log").read_text(),
        "model": model,
        "reference": reference,
        "max_steps": steps["max_steps"],
    }


def test_training_spans_two_nodes_and_equals_one_process(two_node_run):
    """One allocation on both nodes; 4 DDP ranks, 2 per node, Gloo between the nodes'
    namespaces; all finish; the exported model equals one process's on the same global batches
    (the tolerance of test_two_ddp_processes_match_one_process), preemption included."""
    run = two_node_run
    job = run["job"]
    assert (job["NumNodes"], job["NumTasks"], job["NodeList"]) == (
        str(NODES),
        str(WORLD),
        "cfnode[1-2]",
    )
    assert job["TresPerNode"] == f"gres:gpu:{TASKS_PER_NODE}"
    assert job["JobState"] == "COMPLETED"
    for attempt in ("first_attempt", "second_attempt"):
        seen = rank_lines(run[attempt])
        assert seen["ranks"] == set(range(WORLD)), run[attempt][-3000:]
        assert seen["node_ranks"] == {0, 1}
        # Two ranks on each node, node rank n on the n-th node: two hosts, not one host twice.
        assert seen["placement"] == PLACEMENT
    finished = rank_lines(run["second_attempt"])["finished"]
    assert finished == {(rank, run["max_steps"]) for rank in range(WORLD)}
    assert "rank 0 of world size 1 " in run["single_log"]

    one, four = load_file(run["reference"]), load_file(run["model"])
    assert one.keys() == four.keys()
    changed = 0
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-5)
        changed += int(not torch.equal(one[name], four[name]))
    assert changed > 0  # the comparison is not vacuous: the reductions did differ
    for path in (run["model"], run["reference"]):
        assert json.loads((path.parent / "config.json").read_text())["steps"] == run["max_steps"]


def test_two_node_training_is_preempted_requeued_and_resumed(two_node_run):
    """On SIGUSR1 the four ranks save one HPC checkpoint together, rank 0 requeues the job, and
    the restarted job resumes from that checkpoint on both nodes while Snakemake waits and then
    reports success."""
    run = two_node_run
    saved = re.search(
        rf"saved (\S+hpc_ckpt_(\d+)\.ckpt) on Slurm's signal; requeue of job {run['job_id']}: done",
        run["first_attempt"],
    )
    assert saved, run["first_attempt"][-3000:]
    assert 0 < int(saved.group(2)) < run["max_steps"]
    assert not rank_lines(run["first_attempt"])["finished"]
    assert run["job"]["Restarts"] == "1" and run["job"]["JobState"] == "COMPLETED"
    second = run["second_attempt"]
    assert second.count(f"resuming from {saved.group(1)}") == WORLD, second[-3000:]


def test_grouped_preparation_and_a_bad_file_failing_alone(slurm_cluster, tmp_path):
    """Preparation jobs run in groups of four files per Slurm job; a truncated file fails only
    its own outputs: every other file, its group's included, is prepared, and after the file
    is fixed only it (and the aggregations waiting for it) runs."""
    root = tmp_path / "bad"
    rows = demo_rows(root, ["demo_pbmc_ids", "demo_brain"])
    inputs = root / "inputs"
    copies = [inputs / f"copy{i}.h5ad" for i in range(5)]
    rows += [{"dataset": c.stem, "species": "hsapiens", "path": str(c)} for c in copies]
    truncated = inputs / "broken.h5ad"
    rows.append({"dataset": "broken", "species": "hsapiens", "path": str(truncated)})
    root.mkdir()
    project = Project(root, rows, {**CONFIG, "train": {"enabled": False}})
    env = cluster_env(slurm_cluster)
    # The demo files first (a local run), then copies of one and a broken copy.
    demo = project.snakemake(*[r["path"] for r in rows[:2]])
    assert demo.returncode == 0, demo.stdout[-3000:]
    inputs.mkdir()
    good_bytes = Path(rows[0]["path"]).read_bytes()
    for copy in copies:
        copy.write_bytes(good_bytes)
    truncated.write_bytes(good_bytes[: len(good_bytes) // 3])
    assert len(rows) == 8  # 8 files: two groups of four, the broken file sharing one

    slurm_cluster.cancel_all_jobs()
    slurm_cluster.wait_until_idle()
    grouping = ("--group-components", "preprocess_files=4", "aggregate_datasets=4")
    # Only this test's jobs count: the cluster remembers earlier tests' jobs for a while.
    last_job = max((int(job["id"]) for job in slurm_cluster.squeue()), default=0)
    failed = project.snakemake(*FAST_POLLING, *grouping, profile=PROFILE, env=env, timeout=2400)
    assert failed.returncode != 0
    (log_file,) = (project.results / "logs" / "preprocess" / "broken").glob("*.log")
    error = log_file.read_text()
    assert f"dataset 'broken', file '{truncated}'" in error and "cannot be read as h5ad" in error
    assert not (project.results / "data" / "broken").exists()
    assert not (project.results / "shards" / "broken").exists()
    preprocess_jobs = jobs_by_rule(slurm_cluster, after=last_job)["preprocess_files_preprocess"]
    assert len(preprocess_jobs) == 2
    assert sorted(job["JobState"] for job in preprocess_jobs) == ["COMPLETED", "FAILED"]
    # Every other file was prepared, the three in the broken file's group too.
    for row in rows[:-1]:
        name = row["dataset"]
        stem = Path(row["path"]).stem
        assert (project.results / "shards" / name / stem).is_dir(), name
        assert (project.results / "data" / name / "h5ads" / f"{stem}.h5ad").is_file(), name
    # Nothing else is planned again: the next run does the broken file and what waits for it
    # (aggregations in its group job wait too: profiles/README.md).
    truncated.write_bytes(good_bytes)
    assert project.planned_wildcards("preprocess") == ["dataset=broken, file=broken"]
    fixed = project.snakemake(*FAST_POLLING, *grouping, profile=PROFILE, env=env, timeout=2400)
    assert fixed.returncode == 0, fixed.stdout[-6000:]
    assert (project.results / "manifests" / "shards.parquet").is_file()
    assert project.planned_jobs() == {}


def test_cluster_offers_its_cpus_and_fake_gpus(slurm_cluster):
    result = slurm_cluster.run(
        "srun", "--partition=gpu", "--ntasks=1", "--cpus-per-task=6", "--gres=gpu:2",
        "bash", "-c", "echo $SLURM_JOB_ID $CUDA_VISIBLE_DEVICES $SLURM_CPUS_PER_TASK",
    )  # fmt: skip
    job_id, gpus, cpus = result.stdout.split()
    assert (gpus, cpus) == ("0,1", "6")
    assert slurm_cluster.wait_for_job(job_id, ("COMPLETED",)) == "COMPLETED"


def test_each_node_is_a_host_of_its_own(two_nodes):
    """One step on both nodes: each task sees its node's hostname and only its node's address,
    and the node names resolve to those addresses (what Lightning and Gloo rely on)."""
    result = two_nodes.run(
        "srun", "--partition=gpu", "--nodes=2", "--ntasks-per-node=1", "bash", "-c",
        'echo "$SLURM_NODEID|$(hostname)|$(hostname -I)|$(getent hosts cfnode1 cfnode2 | tr "\\n" ";")"',
    )  # fmt: skip
    resolved = sorted((address, node) for node, address in two_nodes.addresses.items())
    seen = {}
    for line in result.stdout.splitlines():
        node_id, hostname, addresses, hosts = line.split("|")
        pairs = [tuple(pair.split()) for pair in hosts.split(";") if pair]
        seen[int(node_id)] = (hostname, addresses.split(), sorted(pairs))
    assert seen == {
        i: (node, [two_nodes.addresses[node]], resolved) for i, node in enumerate(two_nodes.nodes)
    }
