"""Snakemake's slurm executor against a real single-node Slurm cluster.

These tests pin down how the slurm profile must look (see tests/SLURM_FINDINGS.md): plain CPU jobs,
a multi-task "GPU" training job that runs real Lightning DDP under `srun`, requeue after a
preemption signal with resume from Lightning's HPC checkpoint, and a failing job under
`--keep-going`. The workflows are throwaway Snakefiles in tmp dirs, not the real pipeline.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster, available

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(not available(), reason="needs root and Slurm (.ci/install_slurm.sh)"),
]

PYTHON = sys.executable
# The profile under test: the settings a real `profiles/slurm` needs on a cluster without
# slurmdbd, plus slurm-keep-successful-logs (for inspection) and tiny resource defaults.
PROFILE = {
    "executor": "slurm",
    "jobs": 20,
    # The plugin waits this long before its first status check and returns to it after every
    # check that saw a job finish; after a check that saw none it adds 10 s (up to 180 s).
    # (seconds-between-status-checks has no effect with this plugin.)
    "slurm-init-seconds-before-status-checks": 2,
    # No slurmdbd: sacct cannot answer. squeue sees finished jobs for MinJobAge seconds.
    "slurm-status-command": "squeue",
    "slurm-keep-successful-logs": True,
    "default-resources": {"slurm_partition": "debug", "mem_mb": 500, "runtime": 10},
}
# How the training rule starts one process per task. The jobstep strips SLURM_NTASKS and
# friends, so the layout must be explicit; the interpreter is explicit because `srun` runs
# whatever `python` its PATH finds.
LAUNCHER = f"srun --nodes=1 --ntasks-per-node=2 {PYTHON}"
WORKFLOW_TIMEOUT = 600

# A toy Lightning run. Lightning picks SLURMEnvironment by itself when SLURM_NTASKS is set
# (auto_requeue on by default). With --slow, training steps sleep so that the test can
# preempt the job; a run that finds an HPC checkpoint resumes from it and runs at full speed.
TRAIN_PY = """\
import argparse, json, os, time
from pathlib import Path

import lightning as L
import torch

parser = argparse.ArgumentParser()
parser.add_argument("output")
parser.add_argument("--root", required=True)
parser.add_argument("--max-steps", type=int, default=8)
parser.add_argument("--slow", action="store_true")
args = parser.parse_args()
root = Path(args.root)
root.mkdir(parents=True, exist_ok=True)
resumed = any(root.glob("hpc_ckpt_*.ckpt"))
env = {k: os.environ.get(k) for k in (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES",
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS",
    "SLURM_RESTART_COUNT", "SLURM_CONF")}
with open(root / "attempts.jsonl", "a") as f:
    f.write(json.dumps({"resumed": resumed, "time": time.time(), **env}) + "\\n")


class Toy(L.LightningModule):
    def __init__(self, slow):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.slow = slow
        self.first_step = None

    def training_step(self, batch, batch_idx):
        if self.first_step is None:
            self.first_step = self.global_step
        if self.slow:
            if self.global_step == 2 and self.global_rank == 0:
                (root / "training").write_text(os.environ["SLURM_JOB_ID"])
            time.sleep(0.5)
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
trainer = L.Trainer(
    accelerator="cpu", devices=2, num_nodes=1, strategy="ddp", max_steps=args.max_steps,
    default_root_dir=str(root), logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False,
)
model = Toy(slow=args.slow and not resumed)
trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
record = {
    "rank": trainer.global_rank, "world_size": trainer.world_size,
    "cluster_environment": type(trainer.strategy.cluster_environment).__name__,
    "resumed": resumed, "first_step": model.first_step, "final_step": trainer.global_step,
    "env": env,
}
Path(f"{args.output}.rank{trainer.global_rank}.json").write_text(json.dumps(record))
trainer.strategy.barrier()
if trainer.global_rank == 0:
    Path(args.output).write_text(json.dumps(record))
"""


# -- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=8, gpus=4, memory_mb=16000) as cluster:
        yield cluster


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> SlurmCluster:
    """The session's cluster, idle at the start of each test."""
    slurm_cluster.cancel_all_jobs()  # left over by an earlier test that failed
    slurm_cluster.wait_until_idle()
    return slurm_cluster


def skip_without_lightning() -> None:
    # find_spec, not importorskip: importing Lightning here would cost seconds for nothing.
    if importlib.util.find_spec("lightning") is None:
        pytest.skip("lightning is not installed")


def make_workflow(root: Path, *snakefile: str, train_script: bool = False) -> Path:
    """A workflow directory: Snakefile (the parts, each dedented), profile and train.py."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "Snakefile").write_text("".join(textwrap.dedent(part) for part in snakefile))
    (root / "profile").mkdir(exist_ok=True)
    (root / "profile" / "config.yaml").write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    if train_script:
        (root / "train.py").write_text(TRAIN_PY)
    return root


def start_workflow(root: Path, cluster: SlurmCluster, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PYTHON, "-m", "snakemake", "--profile", "profile", "--verbose", *args],
        cwd=root,
        env=cluster.env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen, root: Path, cluster: SlurmCluster) -> tuple[int, str]:
    """Wait for a Snakemake run; return its exit status and output."""
    try:
        output, _ = proc.communicate(timeout=WORKFLOW_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        cluster.cancel_all_jobs()
        pytest.fail(f"snakemake timed out\n{diagnostics(root, output)}")
    (root / "snakemake.out").write_text(output)
    return proc.returncode, output


def run_workflow(root: Path, cluster: SlurmCluster, *args: str) -> tuple[int, str, float]:
    """Run Snakemake to the end; return its exit status, output and duration."""
    started = time.monotonic()
    status, output = finish(start_workflow(root, cluster, *args), root, cluster)
    return status, output, time.monotonic() - started


def diagnostics(root: Path, output: str) -> str:
    parts = ["--- snakemake (tail) ---", "\n".join(output.splitlines()[-60:])]
    for log in sorted((root / ".snakemake" / "slurm_logs").rglob("*.log")):
        parts += [f"--- {log.relative_to(root)} (tail) ---", log.read_text()[-3000:]]
    for log in sorted((root / "logs").glob("*.log")):
        parts += [f"--- {log.relative_to(root)} (tail) ---", log.read_text()[-3000:]]
    return "\n".join(parts)


def sbatch_calls(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("sbatch call:")]


def sbatch_call_for(output: str, rule: str) -> str:
    calls = [c for c in sbatch_calls(output) if f"--comment rule_{rule}" in c]
    assert calls, f"no sbatch call for rule {rule} in the output"
    return calls[0]


# -- the cluster itself ------------------------------------------------------------------------


def test_cluster_offers_more_cpus_than_the_machine_and_fake_gpus(cluster: SlurmCluster) -> None:
    result = cluster.run(
        "srun", "--partition=gpu", "--ntasks=1", "--cpus-per-task=6", "--gres=gpu:3",
        "bash", "-c", "echo $SLURM_JOB_ID $CUDA_VISIBLE_DEVICES $SLURM_CPUS_PER_TASK",
    )  # fmt: skip
    job_id, gpus, cpus = result.stdout.split()
    assert (gpus, cpus) == ("0,1,2", "6")
    # srun returns while the job may still be COMPLETING.
    assert cluster.wait_for_job(job_id, ("COMPLETED",)) == "COMPLETED"
    job = cluster.job(job_id)
    assert job["NumCPUs"] == "6"
    assert job["TresPerNode"] == "gres:gpu:3"


# -- a + b: CPU jobs and a multi-task "GPU" training job in one workflow ----------------------


TRAIN_RULE = f"""
rule train:
    output:
        "out/train.json",
    log:
        "logs/train.log",
    resources:
        gres="gpu:2",
        mpi="srun",
        nodes=1,
        tasks_per_node=2,
        cpus_per_task=1,
        mem_mb=4000,
        runtime=10,
        launcher="{LAUNCHER}",
    shell:
        "{{resources.launcher}} train.py {{output}} --root work/train > {{log}} 2>&1"
"""


@pytest.fixture(scope="module")
def cpu_and_train_run(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory):
    skip_without_lightning()
    slurm_cluster.cancel_all_jobs()
    slurm_cluster.wait_until_idle()
    root = make_workflow(
        tmp_path_factory.mktemp("cpu_and_train"),
        """
        rule all:
            input:
                expand("out/cpu_{i}.txt", i=range(3)),
                "out/train.json",

        rule cpu:
            output:
                "out/cpu_{i}.txt",
            resources:
                mem_mb=300,
                runtime=5,
                cpus_per_task=2,
            shell:
                "echo $SLURM_JOB_ID > {output}"
        """,
        TRAIN_RULE,
        train_script=True,
    )
    status, output, seconds = run_workflow(root, slurm_cluster)
    return root, status, output, seconds


def test_cpu_jobs_get_their_resources(cpu_and_train_run, slurm_cluster: SlurmCluster) -> None:
    root, status, output, seconds = cpu_and_train_run
    assert status == 0, diagnostics(root, output)
    print(f"cpu + train workflow: {seconds:.1f} s")
    call = sbatch_call_for(output, "cpu")
    for flag in ("-p debug", "-t 5", "--mem 300", "--ntasks=1", "--cpus-per-task=2"):
        assert flag in call, call
    for i in range(3):
        job = slurm_cluster.job((root / f"out/cpu_{i}.txt").read_text().strip())
        assert job["JobState"] == "COMPLETED"
        assert job["MinMemoryNode"] == "300M"
        assert job["TimeLimit"] == "00:05:00"
        assert job["CPUs/Task"] == "2"
        assert job["Partition"] == "debug"


def test_training_rule_runs_lightning_ddp_over_two_tasks(
    cpu_and_train_run, slurm_cluster: SlurmCluster
) -> None:
    root, status, output, _ = cpu_and_train_run
    assert status == 0, diagnostics(root, output)
    call = sbatch_call_for(output, "train")
    for flag in (
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gres=gpu:2",
        "--mem 4000",
        "-t 10",
    ):
        assert flag in call, call
    assert "--ntasks-per-gpu" not in call

    ranks = [json.loads((root / f"out/train.json.rank{r}.json").read_text()) for r in (0, 1)]
    for rank, record in enumerate(ranks):
        assert record["rank"] == rank
        assert record["world_size"] == 2
        assert record["cluster_environment"] == "SLURMEnvironment"
        env = record["env"]
        assert env["SLURM_NTASKS"] == "2"
        assert env["SLURM_NTASKS_PER_NODE"] == "2"
        assert env["SLURM_NNODES"] == "1"
        assert env["SLURM_PROCID"] == env["SLURM_LOCALID"] == str(rank)
        assert env["SLURM_NODEID"] == "0"
        # Both tasks see both GPUs of the allocation; Lightning picks one by local rank.
        assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
        # srun names the step after the program; Lightning ignores SLURM for "bash".
        assert env["SLURM_JOB_NAME"] == "python"
    job = slurm_cluster.job(ranks[0]["env"]["SLURM_JOB_ID"])
    assert job["NumTasks"] == "2"
    assert job["TresPerNode"] == "gres:gpu:2"


# -- c: preemption signal, requeue and resume ----------------------------------------------------


def test_preempted_training_is_requeued_and_resumes(cluster: SlurmCluster, tmp_path: Path) -> None:
    skip_without_lightning()
    root = make_workflow(
        tmp_path,
        """
        rule all:
            input:
                "out/train.json",
        """,
        TRAIN_RULE.replace(
            "runtime=10,", "runtime=10,\n        slurm_extra=\"'--signal=SIGUSR1@90'\","
        ).replace("--root work/train", "--root work/train --slow --max-steps 40"),
        train_script=True,
    )
    started = time.monotonic()
    proc = start_workflow(root, cluster)
    # train.py writes this (the job ID) once it is in its training loop.
    marker = root / "work/train/training"
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            output, _ = proc.communicate()
            cluster.cancel_all_jobs()
            pytest.fail(f"training never started\n{diagnostics(root, output)}")
        time.sleep(0.5)
    job_id = marker.read_text().strip()
    signalled = time.monotonic() - started
    # What Slurm does --signal seconds before the time limit, without the wait: SIGUSR1 to
    # every step of the job (not to the batch shell, which runs Snakemake's jobstep).
    cluster.run("scancel", "--signal=USR1", job_id)
    status, output = finish(proc, root, cluster)
    seconds = time.monotonic() - started
    print(f"requeue workflow: {seconds:.1f} s (signal at {signalled:.1f} s)")

    assert status == 0, diagnostics(root, output)
    assert "--signal=SIGUSR1@90" in sbatch_call_for(output, "train")
    job = cluster.job(job_id)
    assert job["JobState"] == "COMPLETED"
    assert job["Restarts"] == "1"
    attempts = [
        json.loads(line) for line in (root / "work/train/attempts.jsonl").read_text().splitlines()
    ]
    assert [a["resumed"] for a in attempts] == [False, False, True, True]
    assert {a["SLURM_JOB_ID"] for a in attempts} == {job_id}
    assert (root / "work/train/hpc_ckpt_1.ckpt").exists()
    record = json.loads((root / "out/train.json").read_text())
    assert record["resumed"] is True
    assert record["first_step"] >= 2, "the requeued run did not resume from the checkpoint"
    assert record["final_step"] == 40


# -- d: one failing job does not stop the others under --keep-going ----------------------------


def test_failing_job_fails_alone_with_keep_going(cluster: SlurmCluster, tmp_path: Path) -> None:
    root = make_workflow(
        tmp_path,
        """
        rule all:
            input:
                expand("out/ok_{i}.txt", i=range(2)),
                "out/bad.txt",
                "out/after_ok.txt",

        rule ok:
            output:
                "out/ok_{i}.txt",
            shell:
                "sleep 2; echo $SLURM_JOB_ID > {output}"

        rule bad:
            output:
                "out/bad.txt",
            shell:
                "echo $SLURM_JOB_ID > out/bad_job_id; exit 3"

        rule after_ok:
            input:
                "out/ok_0.txt",
            output:
                "out/after_ok.txt",
            shell:
                "cp {input} {output}"
        """,
    )
    status, output, seconds = run_workflow(root, cluster, "--keep-going")
    print(f"keep-going workflow: {seconds:.1f} s")
    assert status != 0, diagnostics(root, output)
    for name in ("ok_0.txt", "ok_1.txt", "after_ok.txt"):
        assert (root / "out" / name).exists(), diagnostics(root, output)
    assert not (root / "out/bad.txt").exists()
    assert "Error in rule bad" in output
    bad_job = (root / "out/bad_job_id").read_text().strip()
    assert f"SLURM-job '{bad_job}' failed, SLURM status is: 'FAILED'" in output
    assert cluster.job(bad_job)["JobState"] == "FAILED"
    assert sum("Error in rule" in line for line in output.splitlines()) == 1
