"""Checkpoint save and load time for a ~100M-parameter model (target: under 30 s each).

    python benchmarks/bench_checkpoint.py [--preset 106m] [--dir /tmp/cellfoundry-bench-ckpt]

Builds the training system of a Geneformer-106M-sized encoder (12 layers, width 768, FFN 3072,
a 25,426-token vocabulary) with AdamW state for every parameter (as after a training step),
then times, each the median of --repeats runs:

- Lightning's `Trainer.save_checkpoint` (weights + optimizer + scheduler + loops, what
  training writes every N steps and on Slurm preemption) and the load that resume does
  (`torch.load` + `load_state_dict` of module and optimizer);
- the final export (`model.safetensors`, `load_pretrained`);
- the baseline: writing and reading the same number of bytes as one raw buffer
  (`numpy.tofile` + fsync, `numpy.fromfile`), i.e. what the disk allows.

Prints a markdown table with seconds and the ratio to the raw-I/O baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cellfoundry.models.encoder import EncoderConfig
from cellfoundry.models.model import CellModel, ModelConfig
from cellfoundry.train.system import OptimizerConfig, PretrainingSystem

PRESETS = {
    "106m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072},
    "10m": {"d_model": 256, "n_layers": 6, "n_heads": 4, "d_ff": 512},
}


class OneBatch(Dataset):
    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(3, self.vocab, (2, 32), generator=g)
        return {
            "tokens": tokens,
            "values": torch.randint(1, 51, (2, 32), generator=g),
            "targets": torch.randint(1, 51, (2, 32), generator=g),
            "loss_mask": torch.rand(2, 32, generator=g) < 0.5,
            "padding_mask": torch.zeros(2, 32, dtype=torch.bool),
        }


class Objective:
    name = "binned_mlm"

    def loss(self, model: CellModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from cellfoundry.models.losses import masked_cross_entropy

        mask = batch["loss_mask"]
        logits = model.value_head(model.encode(batch), mask)
        loss, accuracy = masked_cross_entropy(logits, batch["targets"][mask])
        return {"loss": loss, "accuracy": accuracy}


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="106m")
    parser.add_argument("--vocab", type=int, default=25_426)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cellfoundry-bench-ckpt"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)

    encoder = EncoderConfig(
        vocab_size=args.vocab,
        max_len=64,
        n_values=52,
        position="none",
        norm_first=True,
        **PRESETS[args.preset],
    )
    system = PretrainingSystem(
        ModelConfig("binned_mlm", encoder, 51),
        Objective(),
        OptimizerConfig(max_steps=10, warmup_steps=1),
    )
    n_params = sum(p.numel() for p in system.parameters())
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.dir,
    )
    # One real optimizer step: AdamW's state (exp_avg, exp_avg_sq) exists for every parameter.
    trainer.fit(system, DataLoader(OneBatch(args.vocab), batch_size=None))

    checkpoint = args.dir / "step.ckpt"
    save_s, _ = timed(lambda: trainer.save_checkpoint(checkpoint), args.repeats)
    size = checkpoint.stat().st_size

    def load() -> None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        system.load_state_dict(state["state_dict"])
        trainer.optimizers[0].load_state_dict(state["optimizer_states"][0])

    load_s, _ = timed(load, args.repeats)

    from safetensors.torch import load_model

    from cellfoundry.train.data import VocabularyLayout
    from cellfoundry.train.export import export_model

    layout = VocabularyLayout(("hsapiens",), {"hsapiens": 3}, {}, args.vocab)
    export = args.dir / "final"
    export_s, _ = timed(
        lambda: export_model(system.model, layout, {}, export, metadata={}), args.repeats
    )
    fresh = CellModel(system.model.config)
    import_s, _ = timed(lambda: load_model(fresh, str(export / "model.safetensors")), args.repeats)
    export_size = (export / "model.safetensors").stat().st_size

    raw = args.dir / "raw.bin"
    buffer = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)

    def raw_write() -> None:
        with open(raw, "wb") as handle:
            buffer.tofile(handle)
            handle.flush()
            os.fsync(handle.fileno())

    raw_write_s, _ = timed(raw_write, args.repeats)
    raw_read_s, _ = timed(lambda: np.fromfile(raw, dtype=np.uint8), args.repeats)

    print(
        f"model: {args.preset} preset, {n_params / 1e6:.1f}M parameters; checkpoint {size / 2**30:.2f} GiB "
        f"(weights + AdamW state), export {export_size / 2**20:.0f} MiB; median of {args.repeats}\n"
    )
    print("| operation | seconds | ratio vs raw I/O of the same bytes |")
    print("|---|---:|---:|")
    rows = [
        ("save training checkpoint (Trainer.save_checkpoint)", save_s, raw_write_s),
        ("load training checkpoint (torch.load + load_state_dict)", load_s, raw_read_s),
        ("export model.safetensors", export_s, raw_write_s * export_size / size),
        ("load model.safetensors", import_s, raw_read_s * export_size / size),
        ("baseline: raw write + fsync", raw_write_s, raw_write_s),
        ("baseline: raw read", raw_read_s, raw_read_s),
    ]
    for name, seconds, baseline in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / baseline:.1f}x |")
    for path in (checkpoint, raw):
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
