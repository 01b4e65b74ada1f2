"""Files larger than memory: preprocessing + shards of one CELLxGENE-like h5ad of N cells.

    python benchmarks/bench_scale.py [--cells 100000 1000000] [--workdir /tmp/cellfoundry-scale]
                                     [--baseline-cells 100000] [--baseline-rev 2f105be]

Generates, streaming (the generator holds one block of cells at a time), an h5ad shaped like a
CELLxGENE download: ~30,000 human Ensembl genes, integer counts in `raw.X` (float32, as
CELLxGENE stores them), log-normalized floats in `X`, 200 to 6,000 expressed genes per cell
(log-normal, median ~1,000), a few categorical obs columns. Then runs the `preprocess` command
(it writes the h5ad, the shard, the statistics and the QC record in one streaming pass) as the
workflow does, in its own process on one core (NUMBA/OMP/BLAS threads = 1), and reads its wall
time and peak RSS from GNU time. The baseline is the code before streaming (`--baseline-rev`,
checked out into a temporary git worktree), whose `preprocess` and `shards` commands read the
whole file, at `--baseline-cells` only (it needs far more memory). Prints a markdown table and
the ratios. Not run by CI; needs ~35 GB of disk at 1M cells.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ONE_CORE = {
    "NUMBA_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "POLARS_MAX_THREADS": "1",
}
REPO = Path(__file__).resolve().parents[1]
BLOCK = 5_000  # cells generated at a time


def write_cellxgene_like(path: Path, n_cells: int, *, n_genes: int = 30_000, seed: int = 0) -> None:
    """Write the synthetic h5ad block by block (see the module docstring)."""
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import write_elem

    from cellfoundry.reference import load_bundled

    rng = np.random.default_rng(seed)
    table = load_bundled("hsapiens").table
    mito = table.filter(table["gene_name"].str.starts_with("MT-"))
    rest = table.filter(~table["gene_name"].str.starts_with("MT-")).sample(
        n_genes - mito.height, seed=seed
    )
    genes = mito.vstack(rest)
    order = np.argsort(genes["gene_id"].to_numpy())
    gene_ids = genes["gene_id"].to_numpy()[order]
    gene_names = genes["gene_name"].to_numpy()[order]
    is_mito = np.char.startswith(gene_names.astype(str), "MT-")
    popularity = rng.gamma(0.3, 1.0, n_genes)
    popularity[is_mito] = popularity.max()
    popularity /= popularity.sum()
    expression = 0.2 + 30 * popularity / popularity.max()
    tmp = path.with_suffix(".partial")
    with h5py.File(tmp, "w") as handle:
        handle.attrs["encoding-type"] = "anndata"
        handle.attrs["encoding-version"] = "0.1.0"
        groups = {}
        for name in ("X", "raw/X"):
            group = handle.create_group(name)
            group.attrs["encoding-type"] = "csr_matrix"
            group.attrs["encoding-version"] = "0.1.0"
            group.attrs["shape"] = np.array([n_cells, n_genes])
            for dataset, dtype in (("data", np.float32), ("indices", np.int32)):
                group.create_dataset(
                    dataset, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1 << 20,)
                )
            groups[name] = group
        handle["raw"].attrs["encoding-type"] = "raw"
        handle["raw"].attrs["encoding-version"] = "0.1.0"
        indptr = [np.zeros(1, dtype=np.int64)]
        nnz = 0
        for start in range(0, n_cells, BLOCK):
            m = min(BLOCK, n_cells - start)
            per_cell = np.clip(rng.lognormal(np.log(1_000), 0.6, m), 200, 6_000).astype(np.int64)
            cell = np.repeat(np.arange(m), per_cell)
            gene = rng.choice(n_genes, size=len(cell), p=popularity)
            order = np.lexsort((gene, cell))
            cell, gene = cell[order], gene[order]
            first = np.ones(len(cell), dtype=bool)
            first[1:] = (cell[1:] != cell[:-1]) | (gene[1:] != gene[:-1])
            cell, gene = cell[first], gene[first]
            counts = (1 + rng.poisson(expression[gene])).astype(np.float32)
            lengths = np.bincount(cell, minlength=m)
            totals = np.bincount(cell, weights=counts, minlength=m)
            normalized = np.log1p(counts / totals[cell] * 1e4).astype(np.float32)
            for name, values in (("raw/X", counts), ("X", normalized)):
                group = groups[name]
                for dataset, array in (("data", values), ("indices", gene.astype(np.int32))):
                    target = group[dataset]
                    target.resize((nnz + len(array),))
                    target[nnz:] = array
            indptr.append(nnz + np.cumsum(lengths))
            nnz += len(gene)
        offsets = np.concatenate(indptr)
        for group in groups.values():
            group.create_dataset("indptr", data=offsets)
        var = pd.DataFrame({"feature_name": gene_names}, index=pd.Index(gene_ids))
        obs = pd.DataFrame(
            {
                "cell_type": pd.Categorical.from_codes(
                    rng.integers(0, 20, n_cells), [f"type {i}" for i in range(20)]
                ),
                "donor_id": pd.Categorical.from_codes(
                    rng.integers(0, 50, n_cells), [f"donor {i}" for i in range(50)]
                ),
                "assay": pd.Categorical(["10x 3' v3"] * n_cells),
                "organism_ontology_term_id": pd.Categorical(["NCBITaxon:9606"] * n_cells),
            },
            index=pd.Index([f"cell-{i:08d}" for i in range(n_cells)]),
        )
        write_elem(handle, "obs", obs)
        write_elem(handle, "var", var)
        write_elem(handle, "raw/var", var)
        for name in ("uns", "layers", "obsm", "obsp", "varm", "varp"):
            write_elem(handle, name, {})
    tmp.rename(path)


def timed(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Run a command under GNU time: wall seconds, CPU seconds (user + system) and peak RSS
    (GiB) of its process tree's largest process."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        result = subprocess.run(
            ["/usr/bin/time", "-o", report.name, "-f", "%e %U %S %M", *command],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
        )
        if result.returncode:
            raise RuntimeError(f"{' '.join(command[:4])} failed:\n{result.stderr[-3000:]}")
        wall, user, system, rss_kb = report.read().split()[-4:]
    cpu = float(user) + float(system)
    return {"seconds": float(wall), "cpu_seconds": cpu, "rss_gib": int(rss_kb) / 2**20}


def run_new(
    data: Path, reference: Path, out: Path, block_cells: int, exact_max_cells: int
) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, **ONE_CORE, "PYTHONPATH": str(REPO / "src")}
    return timed(
        [
            sys.executable,
            "-m",
            "cellfoundry",
            "preprocess",
            "--dataset",
            "bench",
            "--file",
            data.stem,
            "--species",
            "hsapiens",
            "--input",
            str(data),
            "--reference",
            str(reference),
            "--settings",
            "{}",
            "--n-bins",
            "51",
            "--exact-max-cells",
            str(exact_max_cells),
            "--block-cells",
            str(block_cells),
            "--h5ad",
            str(out / "out.h5ad"),
            "--shard",
            str(out / "shard"),
            "--gene-stats",
            str(out / "stats.parquet"),
            "--qc",
            str(out / "qc.json"),
            "--cells",
            str(out / "cells.parquet"),
        ],
        env,
        REPO,
    )


def run_baseline(data: Path, reference: Path, out: Path, rev: str) -> dict[str, float]:
    """The code of `rev`: whole-file `preprocess`, then `shards` reading the h5ad again."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tree = out / "code"
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=REPO, check=True
    )
    try:
        env = {**os.environ, **ONE_CORE, "PYTHONPATH": str(tree / "src")}
        pre = timed(
            [
                sys.executable,
                "-m",
                "cellfoundry",
                "preprocess",
                "--dataset",
                "bench",
                "--species",
                "hsapiens",
                "--input",
                str(data),
                "--reference",
                str(reference),
                "--settings",
                "{}",
                "--h5ad-dir",
                str(out / "h5ads"),
                "--gene-stats",
                str(out / "stats.parquet"),
                "--qc-json",
                str(out / "qc.json"),
                "--qc-plot",
                str(out / "qc.png"),
                "--provenance",
                str(out / "provenance.json"),
            ],
            env,
            tree,
        )
        shards = timed(
            [
                sys.executable,
                "-m",
                "cellfoundry",
                "shards",
                "--dataset",
                "bench",
                "--species",
                "hsapiens",
                "--h5ad-dir",
                str(out / "h5ads"),
                "--n-bins",
                "51",
                "--out",
                str(out / "shards"),
            ],
            env,
            tree,
        )
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    return {
        "seconds": pre["seconds"] + shards["seconds"],
        "cpu_seconds": pre["cpu_seconds"] + shards["cpu_seconds"],
        "rss_gib": max(pre["rss_gib"], shards["rss_gib"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--baseline-cells", type=int, default=100_000, help="0: no baseline")
    parser.add_argument("--baseline-rev", default="2f105be", help="the code before streaming")
    parser.add_argument("--block-cells", type=int, default=4096)
    parser.add_argument(
        "--exact-max-cells", type=int, default=None, help="default: the config's gene_stats one"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cellfoundry-scale"
    )
    parser.add_argument("--keep", action="store_true", help="keep outputs (inputs are always kept)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "src"))
    from cellfoundry.config import schema_default
    from cellfoundry.reference import load_bundled, write_reference

    if args.exact_max_cells is None:
        args.exact_max_cells = schema_default("gene_stats.exact_max_cells")

    reference = args.workdir / "hsapiens.parquet"
    if not reference.is_file():
        write_reference(load_bundled("hsapiens"), reference)
    rows = []
    for n_cells in sorted(set(args.cells) | ({args.baseline_cells} - {0})):
        data = args.workdir / f"cellxgene_like_{n_cells}.h5ad"
        if not data.is_file():
            print(f"generating {data} ...", file=sys.stderr, flush=True)
            write_cellxgene_like(data, n_cells)
        size = data.stat().st_size / 2**30
        if n_cells in args.cells:
            result = run_new(
                data,
                reference,
                args.workdir / f"new_{n_cells}",
                args.block_cells,
                args.exact_max_cells,
            )
            qc = json.loads((args.workdir / f"new_{n_cells}" / "qc.json").read_text())
            rows.append(("streaming (this code)", n_cells, size, qc["nnz"], result))
            if not args.keep:
                shutil.rmtree(args.workdir / f"new_{n_cells}")
        if n_cells == args.baseline_cells:
            result = run_baseline(
                data, reference, args.workdir / f"old_{n_cells}", args.baseline_rev
            )
            rows.append((f"whole file ({args.baseline_rev})", n_cells, size, None, result))
            shutil.rmtree(args.workdir / f"old_{n_cells}", ignore_errors=True)
        print(f"done {n_cells}", file=sys.stderr, flush=True)
    print(
        "\npreprocess + shards of one CELLxGENE-like h5ad, one core, "
        f"block_cells={args.block_cells}, exact_max_cells={args.exact_max_cells} "
        f"(load average {os.getloadavg()[0]:.1f}: cells per CPU second is the per-core rate)\n"
    )
    print(
        "| code | cells | input GiB | non-zeros kept | wall s | cells/s | CPU s "
        "| cells per CPU s | peak RSS GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, n_cells, size, nnz, r in rows:
        print(
            f"| {name} | {n_cells:,} | {size:.1f} | {'' if nnz is None else f'{nnz:,}'} | "
            f"{r['seconds']:.0f} | {n_cells / r['seconds']:,.0f} | {r['cpu_seconds']:.0f} | "
            f"{n_cells / r['cpu_seconds']:,.0f} | {r['rss_gib']:.2f} |"
        )
    new = {n: r for name, n, _, _, r in rows if name.startswith("streaming")}
    old = {n: r for name, n, _, _, r in rows if not name.startswith("streaming")}
    if len(new) > 1:
        small, large = min(new), max(new)
        print(
            f"\npeak RSS at {large:,} / at {small:,} cells: {new[large]['rss_gib'] / new[small]['rss_gib']:.2f}x"
        )
    for n in sorted(set(new) & set(old)):
        print(
            f"at {n:,} cells: peak RSS {old[n]['rss_gib'] / new[n]['rss_gib']:.1f}x lower, "
            f"{old[n]['seconds'] / new[n]['seconds']:.1f}x faster than the whole-file code"
        )


if __name__ == "__main__":
    main()
