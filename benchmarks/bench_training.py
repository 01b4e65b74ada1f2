"""Training throughput per preset: tokens/s, cells/s, model FLOPs utilisation, peak memory;
and padding-free vs padded attention on scConcept-like variable cell lengths.

    python benchmarks/bench_training.py [--presets geneformer_10m geneformer_106m] [--steps 20]

Each measurement runs full training steps (forward, backward, AdamW) of the preset's model on
synthetic token batches of its shape, bf16-mixed on CUDA (fp32 on CPU), after warm-up steps.

MFU = model FLOPs per second / peak, with FLOPs per token from `notes/performance.md`:
6 L (4 H^2 + 2 H F) + 12 L S H, plus 6 H V x 0.15 for an MLM head evaluated on masked
positions only. The peak is --peak-tflops (default: 989, H100/H200 bf16 dense) on CUDA; on a
CPU it is the fp32 matrix-multiply rate measured in the same run, so the CPU figure says how
close training comes to what this CPU's matmul can do.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cellfoundry.config import section_defaults
from cellfoundry.models import losses
from cellfoundry.models.encoder import EncoderConfig
from cellfoundry.models.model import CellModel, ModelConfig

VOCAB = 25_426  # Geneformer's vocabulary size
MASK_FRACTION = 0.15


def device_and_dtype() -> tuple[torch.device, torch.dtype | None]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), None


def matmul_peak(device: torch.device, seconds: float = 3.0) -> float:
    """FLOP/s of a large matrix product on this device (bf16 on CUDA, fp32 on CPU)."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(preset: str, device: torch.device) -> tuple[CellModel, dict]:
    settings = section_defaults("train", {"preset": preset})
    m = settings["model"]
    encoder = EncoderConfig(
        vocab_size=VOCAB,
        d_model=m["d_model"],
        n_layers=m["n_layers"],
        n_heads=m["n_heads"],
        d_ff=m["d_ff"],
        dropout=0.0,
        attention_dropout=0.0,
        max_len=m["max_len"],
        norm_first=m["norm_first"],
        activation=m["activation"],
        position="learned",
        n_values=0,
    )
    model = CellModel(ModelConfig("geneformer_mlm", encoder, 51)).to(device)
    return model, settings


def lengths_for(kind: str, n: int, max_len: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "full":
        return np.full(n, max_len)
    # scConcept-like: panel views of very different sizes (log-uniform from 64 to max_len).
    return np.exp(rng.uniform(np.log(64), np.log(max_len), n)).astype(int)


def make_batch(
    lengths: np.ndarray, device: torch.device, padding_free: bool, rng: np.random.Generator
) -> dict:
    total = int(lengths.sum())
    tokens = torch.from_numpy(rng.integers(3, VOCAB, total)).to(device)
    mask = torch.from_numpy(rng.random(total) < MASK_FRACTION).to(device)
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)).to(device)
    if padding_free:
        return {
            "tokens": tokens,
            "loss_mask": mask,
            "targets": tokens,
            "cu_seqlens": cu,
            "max_seqlen": int(lengths.max()),
        }
    width = int(lengths.max())
    padded = torch.ones(len(lengths), width, dtype=torch.long, device=device)
    padded_mask = torch.zeros(len(lengths), width, dtype=torch.bool, device=device)
    padding = torch.ones(len(lengths), width, dtype=torch.bool, device=device)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        padded[i, : b - a] = tokens[a:b]
        padded_mask[i, : b - a] = mask[a:b]
        padding[i, : b - a] = False
    return {"tokens": padded, "loss_mask": padded_mask, "targets": padded, "padding_mask": padding}


def step_time(
    model: CellModel,
    batches: list[dict],
    dtype: torch.dtype | None,
    device: torch.device,
    steps: int,
    warmup: int,
) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            hidden = model.encode(batch)
            logits = model.mlm_head(hidden, batch["loss_mask"])
            loss, _ = losses.masked_cross_entropy(logits, batch["targets"][batch["loss_mask"]])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=None)
    parser.add_argument(
        "--cells", type=int, default=None, help="cells per step (default: 32 on CUDA, 2 on CPU)"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    args = parser.parse_args()
    device, dtype = device_and_dtype()
    cuda = device.type == "cuda"
    presets = args.presets or (
        ["geneformer_10m", "geneformer_106m"] if cuda else ["geneformer_10m"]
    )
    cells = args.cells or (32 if cuda else 2)
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    peak = args.peak_tflops * 1e12 if cuda else matmul_peak(device)
    rng = np.random.default_rng(0)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {name}; precision: {'bf16-mixed' if cuda else 'fp32'}; peak used for MFU: {peak / 1e12:.2f} TFLOP/s"
        f"{'' if cuda else ' (measured fp32 matmul)'}; {cells} cells/step, median of {steps} steps\n"
    )
    print(
        "| preset | cells | layout | tokens/step | step (s) | tokens/s | cells/s | MFU | peak memory (MB) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for preset in presets:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        model, settings = build_model(preset, device)
        if args.compile:
            model.encoder.compile()
        max_len = settings["model"]["max_len"]
        config = model.config.encoder
        draws = {
            kind: [lengths_for(kind, cells, max_len, rng) for _ in range(4)]
            for kind in ("full", "variable")
        }
        padded_time = None
        # The same cells (lengths) for the padded and the padding-free variable-length runs.
        for kind, padding_free in (("full", False), ("variable", False), ("variable", True)):
            lengths = draws[kind]
            batches = [make_batch(x, device, padding_free, rng) for x in lengths]
            seconds = step_time(model, batches, dtype, device, steps, warmup)
            real_tokens = float(np.mean([x.sum() for x in lengths]))
            mean_len = real_tokens / cells
            flops_per_token = (
                model.encoder.flops_per_token(int(mean_len))
                + 6 * config.d_model * VOCAB * MASK_FRACTION
            )
            mfu = flops_per_token * real_tokens / seconds / peak
            layout = "padding-free" if padding_free else "padded"
            speedup = ""
            if kind == "variable" and not padding_free:
                padded_time = seconds
            if padding_free and padded_time:
                speedup = f" ({padded_time / seconds:.2f}x padded)"
            print(
                f"| {preset} | {kind} lengths | {layout}{speedup} | {real_tokens:,.0f} | {seconds:.3f} | "
                f"{real_tokens / seconds:,.0f} | {cells / seconds:,.1f} | {mfu:.1%} | {peak_memory_mb(device):,.0f} |"
            )
        del model
        if cuda:
            torch.cuda.empty_cache()
    if not cuda:
        print(
            "\nNo GPU here. On CPU the padding-free path still packs tokens for every dense layer, but its"
            " attention pads each cell again (PyTorch's varlen kernel and flash-attn are CUDA-only)."
        )


if __name__ == "__main__":
    main()
