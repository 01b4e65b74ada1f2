"""Planning an epoch of training batches over a corpus of many datasets, with and without
dataset rebalancing (`train.dataset_alpha`).

    python benchmarks/bench_batch_plan.py [--datasets 1002] [--cells 13000000] [--batch 64]

A split of --cells training cells in --datasets datasets of one species, sized like a
pretraining corpus: one atlas holding 30% of the cells and the others log-normally sized
(a few hundred to a few hundred thousand cells). For one-dataset batches (contrastive,
diffusion) and mixed batches (MLM) it times building the `BatchPlan` and planning epoch 0,
and the peak of memory allocated meanwhile (tracemalloc, which sees numpy's buffers), at
`dataset_alpha` 1 (every cell once per epoch: the baseline), 0.5 (XLM's) and 0.
Each figure is the median of --repeats runs; prints a markdown table with the ratio of
seconds to the baseline of the same batching mode.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from types import SimpleNamespace

import numpy as np

from cellfoundry.train.data import BatchPlan


def corpus_split(n_datasets: int, n_cells: int, seed: int = 0) -> SimpleNamespace:
    """The parts of a SplitData that a BatchPlan reads, one shard per dataset."""
    rng = np.random.default_rng(seed)
    rest = rng.lognormal(mean=8.5, sigma=1.3, size=n_datasets - 1)
    sizes = np.concatenate([[0.3], 0.7 * rest / rest.sum()]) * n_cells
    sizes = np.maximum(sizes.astype(np.int64), 1)
    stops = np.cumsum(sizes)
    ranges = list(zip((stops - sizes).tolist(), stops.tolist(), strict=True))
    names = [f"dataset_{i:04d}" for i in range(n_datasets)]
    return SimpleNamespace(
        collection=SimpleNamespace(shard_ranges=lambda: ranges),
        datasets=np.arange(n_datasets),
        species=np.array(["hsapiens"] * n_datasets, dtype=object),
        dataset_names=names,
        dataset_name=names.__getitem__,
    )


def measure(data: SimpleNamespace, batch: int, within: bool, alpha: float) -> tuple[float, float]:
    """Seconds to build the plan and plan epoch 0, and the peak allocation in MiB."""
    tracemalloc.start()
    started = time.perf_counter()
    plan = BatchPlan(data, batch, seed=0, within_dataset=within, dataset_alpha=alpha)
    plan.epoch_plan(0)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=1002)
    parser.add_argument("--cells", type=int, default=13_000_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = corpus_split(args.datasets, args.cells)
    total = sum(b - a for a, b in data.collection.shard_ranges())
    print(f"{total:,} training cells in {args.datasets:,} datasets, global batch {args.batch}\n")
    print("| batches | dataset_alpha | seconds (median) | x alpha 1 | peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for within in (True, False):
        baseline = None
        for alpha in (1.0, 0.5, 0.0):
            runs = [measure(data, args.batch, within, alpha) for _ in range(args.repeats)]
            seconds = statistics.median(s for s, _ in runs)
            peak = statistics.median(p for _, p in runs)
            baseline = baseline or seconds
            mode = "one dataset" if within else "mixed"
            print(f"| {mode} | {alpha:g} | {seconds:.2f} | {seconds / baseline:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
