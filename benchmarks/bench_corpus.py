"""Corpora of thousands of datasets: planning, a real prep run, the statistics merge, the loader.

    python benchmarks/bench_corpus.py [--datasets 1000 10000] [--prep 100 1000]
                                      [--baseline-prep 100] [--baseline-rev 2f105be]
                                      [--workdir /tmp/cellfoundry-corpus] [--skip-baseline]

Generates N small datasets (distinct h5ad files of 100 cells x 2,000 human genes; 10,000
datasets are hard links to 1,000 files, distinct paths), then measures with this code and with
the code of `--baseline-rev` (checked out into a temporary git worktree), each on one core
where it is a single process:

- planning: `snakemake -n` of the whole workflow for each N (wall seconds);
- a real `snakemake --profile profiles/local prep` (training off) for each N of `--prep`: wall
  time, jobs and jobs/s (the baseline only for N of `--baseline-prep`: its prep runs are as long
  as ours, and a thousand datasets take most of an hour on two cores);
- the statistics merge of one species over `--merge` datasets (default 1,000): the prep run's
  per-dataset statistics, each linked under `--merge / N` distinct dataset names (the merge
  reads and adds up as many tables as N real datasets give): the `gene-stats` job's wall time
  and peak RSS (GNU time);
- the loader at 10 / 1,000 / 10,000 shards is `bench_loader.py`'s (run it beside this one).

Prints a markdown table per part with the baseline beside. Not run by CI (hours at full size).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scale import timed  # GNU time: wall seconds and peak RSS

REPO = Path(__file__).resolve().parents[1]
ONE_CORE = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1"}
FILES = 1_000


def write_files(folder: Path, n_files: int) -> list[Path]:
    """`n_files` small h5ad files of raw counts, one block at a time."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import polars as pl
    import scipy.sparse as sp

    from cellfoundry.reference import load_bundled

    folder.mkdir(parents=True, exist_ok=True)
    genes = (
        load_bundled("hsapiens").table.filter(pl.col("gene_type") == "protein_coding").head(2_000)
    )
    var = pd.DataFrame(index=pd.Index(genes["gene_id"].to_list()))
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n_files):
        path = folder / f"file{i:05d}.h5ad"
        paths.append(path)
        if path.is_file():
            continue
        X = sp.random(100, 2_000, density=0.2, format="csr", random_state=rng, dtype=np.float32)
        X.data = np.ceil(X.data * 8)
        ad.AnnData(
            X=X, var=var, obs=pd.DataFrame(index=[f"c{i}_{j}" for j in range(100)])
        ).write_h5ad(path)
    return paths


def sheet(workdir: Path, files: list[Path], n: int) -> Path:
    """A dataset sheet of `n` datasets (half human-declared... all human), distinct paths."""
    links = workdir / "links"
    rows = ["dataset\tspecies\tpath\tmin_genes\tmin_counts"]
    for i in range(n):
        target = files[i % len(files)]
        path = target if i < len(files) else links / f"d{i:05d}.h5ad"
        if i >= len(files) and not path.exists():
            links.mkdir(parents=True, exist_ok=True)
            os.link(target, path)
        rows.append(f"d{i:05d}\thsapiens\t{path}\t10\t10")
    out = workdir / f"sheet{n}.tsv"
    out.write_text("\n".join(rows) + "\n")
    return out


def merge_inputs(stats: Path, folder: Path, n: int) -> list[str]:
    """`n` per-dataset statistics files: those of a prep run, hard-linked under distinct names
    as often as needed."""
    made = sorted(stats.glob("*.parquet"))
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"d{i:05d}.parquet"
        if not path.exists():
            os.link(made[i % len(made)], path)
        out.append(str(path))
    return out


def code_tree(rev: str | None, workdir: Path) -> Path:
    if rev is None:
        return REPO
    tree = workdir / f"code-{rev}"
    if not tree.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=REPO, check=True
        )
    return tree


def snakemake(tree: Path, *args: str, timeout: int = 36_000) -> tuple[float, str, float]:
    """Run Snakemake from `tree`: (wall seconds, its output, CPU seconds of it and its jobs)."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result.returncode:
        raise RuntimeError(
            f"snakemake {' '.join(args[:3])} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return elapsed, result.stdout + result.stderr, cpu


def config_file(workdir: Path, tree: Path, sheet_path: Path, project: Path, name: str) -> Path:
    body = {
        "datasets": str(sheet_path),
        "project_path": str(project),
        "train": {"enabled": False},
        "panels": {"hvg": {"n_top_genes": 200}},
        "embeddings": {"coexpression": {"method": "coexpression", "dim": 8, "max_genes": 500}},
    }
    path = workdir / f"config-{name}.yaml"
    path.write_text(json.dumps(body))
    return path


def job_count(log: str) -> int:
    match = re.search(r"^total\s+(\d+)", log, re.MULTILINE)
    return int(match.group(1)) if match else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--prep", type=int, nargs="+", default=[100, 1_000])
    parser.add_argument("--baseline-prep", type=int, nargs="*", default=[100])
    parser.add_argument("--merge", type=int, default=1_000)
    parser.add_argument(
        "--plan-only", action="store_true", help="planning only (no prep run, no merge)"
    )
    parser.add_argument("--baseline-rev", default="2f105be")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cellfoundry-corpus"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    workdir = args.workdir
    files = write_files(workdir / "files", min(FILES, max([*args.datasets, *args.prep])))
    codes = {"this code": None} | (
        {} if args.skip_baseline else {f"previous ({args.baseline_rev})": args.baseline_rev}
    )

    plan_rows, prep_rows, merge_rows = [], [], []
    for label, rev in codes.items():
        tree = code_tree(rev, workdir)
        tag = "new" if rev is None else "old"
        for n in args.datasets:
            config = config_file(
                workdir,
                tree,
                sheet(workdir, files, n),
                workdir / f"plan-{tag}-{n}",
                f"plan-{tag}-{n}",
            )
            seconds, log, cpu = snakemake(tree, "-n", "--cores", "1", "--configfile", str(config))
            plan_rows.append((label, n, job_count(log), seconds, cpu))
            print(
                f"planned {label} {n}: {seconds:.1f} s, {cpu:.1f} CPU s",
                file=sys.stderr,
                flush=True,
            )
        for n_prep in [] if args.plan_only else args.prep if rev is None else args.baseline_prep:
            project = workdir / f"prep-{tag}-{n_prep}"
            shutil.rmtree(project, ignore_errors=True)
            config = config_file(
                workdir, tree, sheet(workdir, files, n_prep), project, f"prep-{tag}-{n_prep}"
            )
            seconds, log, _ = snakemake(
                tree,
                "--profile",
                "profiles/local",
                "--cores",
                "2",
                "prep",
                "--configfile",
                str(config),
            )
            jobs = len(re.findall(r"^Finished job", log, re.MULTILINE)) or len(
                re.findall(r"Finished jobid", log)
            )
            prep_rows.append((label, n_prep, jobs, seconds))
            print(f"prep {label}: {seconds:.0f} s, {jobs} jobs", file=sys.stderr, flush=True)
            # The statistics merge of the species, alone, as its job runs it.
            inputs = merge_inputs(
                project / "stats" / "datasets", workdir / f"merge-{tag}-{n_prep}", args.merge
            )
            env = {**os.environ, **ONE_CORE, "PYTHONPATH": str(tree / "src")}
            command = [
                sys.executable,
                "-m",
                "cellfoundry",
                "gene-stats",
                "--species",
                "hsapiens",
                "--inputs",
                *inputs,
                "--out",
                str(workdir / f"merged-{tag}-{n_prep}.parquet"),
                "--summary",
                str(workdir / f"summary-{tag}-{n_prep}.parquet"),
            ]
            if rev is None:
                command += ["--exact-max-cells", "1000"]
            merge_rows.append((label, len(inputs), timed(command, env, tree)))
    print("\n`snakemake -n` of the whole workflow (one process; CPU seconds = its wall time on an")
    print("otherwise idle core)\n")
    print("| code | datasets | jobs | wall s | CPU s |")
    print("|---|---:|---:|---:|---:|")
    for label, n, jobs, seconds, cpu in plan_rows:
        print(f"| {label} | {n:,} | {jobs:,} | {seconds:.1f} | {cpu:.1f} |")
    print("\n`snakemake --profile profiles/local prep` (2 cores), training off\n")
    print("| code | datasets | jobs run | wall s | jobs/s |")
    print("|---|---:|---:|---:|---:|")
    for label, n, jobs, seconds in prep_rows:
        print(f"| {label} | {n:,} | {jobs:,} | {seconds:.0f} | {jobs / seconds:.2f} |")
    print("\nstatistics merge of one species (`gene-stats`, one core)\n")
    print("| code | datasets | wall s | peak RSS GiB |")
    print("|---|---:|---:|---:|")
    for label, n, r in merge_rows:
        print(f"| {label} | {n:,} | {r['seconds']:.1f} | {r['rss_gib']:.2f} |")
    print("\nloader: see `python benchmarks/bench_loader.py --shards 10 1000 10000` (same ulimit).")


if __name__ == "__main__":
    main()
