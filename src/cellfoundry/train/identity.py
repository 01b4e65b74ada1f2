"""What a training run is, and which of its checkpoints a new start continues from.

A run's identity is a digest of exactly what changes the science:

- the `train` settings less the runtime ones (`RUNTIME_SETTINGS`: loggers, logging, validation
  and checkpoint cadence, workers, compilation, strategy, padding-free kernels, gradient
  checkpointing), with the global batch (batch size x ranks) in place of the per-device batch
  size and the resolved precision (`auto` is `bf16-mixed` on CUDA, `32-true` on CPU) in place
  of the setting;
- the seed and `FORMAT_VERSION` (bumped when our tokenization or training changes meaning);
- the content of every input: the shard manifest (less its paths, so a moved project stays the
  same run), each dataset's `shards/<dataset>/manifest.json` (n_bins, files, cells) and each
  shard's `shard.json` (its source file's checksum, n_bins, cells, non-zeros), the token
  mappings, the gene summaries (corpus medians), gene embeddings, panels, and the gene
  references when `gene_types` restricts the genes.

`max_steps` is not part of it: the learning-rate schedule decides how far two lengths agree
(`system.shared_steps`), and a start continues from the newest checkpoint within that prefix.

`prepare_run_dir` (global rank 0 only) never deletes: checkpoints of another identity (and
that identity's logs, `run.json` and `final/`) move to `superseded/<UTC time>-<identity>/`,
checkpoints past the shared prefix to `superseded/<UTC time>-<identity>-max_steps<old>/`, and
every move is logged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from cellfoundry.io import read_json, sha256, write_json
from cellfoundry.train.system import OptimizerConfig, shared_steps

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MARKER = "run.json"
SUPERSEDED = "superseded"
# Settings that never restart a run (dotted for nested keys).
RUNTIME_SETTINGS = (
    "enabled",
    "run",
    "preset",
    "wandb",
    "tensorboard",
    "log_every_n_steps",
    "num_workers",
    "val_every_n_steps",
    "val_batches",
    "checkpoint_every_n_steps",
    "keep_checkpoints",
    "compile",
    "strategy",
    "padding_free",
    "precision",
    "batch_size",
    "max_steps",
    "model.gradient_checkpointing",
)
# What belongs to one identity inside a run folder (besides `final/`, see `export.publish`).
RUN_FILES = ("checkpoints", "logs", "tensorboard", "wandb", MARKER, "fingerprint.json")
_STEP = re.compile(r"(\d+)(-v\d+)?\.ckpt$")


@dataclass(frozen=True)
class RunIdentity:
    """A run's identity: `digest`, and the digest of each part (to say what changed)."""

    digest: str
    parts: dict[str, str]
    settings: dict[str, Any]


def science_settings(
    settings: dict[str, Any], *, world_size: int, precision: str
) -> dict[str, Any]:
    """The `train` settings that change the science (see the module docstring)."""
    science = copy.deepcopy(settings)
    for dotted in RUNTIME_SETTINGS:
        *parents, last = dotted.split(".")
        node = science
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    science["global_batch"] = settings["batch_size"] * world_size
    science["precision"] = precision
    return science


def input_digests(inputs: Any, *, with_references: bool) -> dict[str, str]:
    """Content digest of every input of a training (`run.TrainInputs`), by name."""
    parts: dict[str, str] = {}
    frame = pl.read_parquet(inputs.manifest)
    rows = frame.drop("shard")
    keys = [name for name, dtype in rows.schema.items() if not isinstance(dtype, pl.List)]
    parts["manifest"] = hashlib.sha256(rows.sort(keys).write_json().encode()).hexdigest()
    by_dataset: dict[str, list[Path]] = {}
    for dataset, shard in frame.select("dataset", "shard").sort("dataset", "shard").iter_rows():
        by_dataset.setdefault(dataset, []).append(Path(shard))
    for dataset, shards in sorted(by_dataset.items()):
        digest = hashlib.sha256()
        dataset_manifest = shards[0].parent / "manifest.json"
        if dataset_manifest.is_file():
            digest.update(dataset_manifest.read_bytes())
        for shard in shards:
            digest.update(shard.name.encode() + b"\x1f" + (shard / "shard.json").read_bytes())
        parts[f"shards/{dataset}"] = digest.hexdigest()
    groups = {
        "token_mappings": inputs.token_mappings,
        "summaries": inputs.summaries,
        "gene_embeddings": inputs.gene_embeddings,
        "references": inputs.references if with_references else {},
    }
    for group, files in groups.items():
        for species, path in sorted(files.items()):
            parts[f"{group}/{species}"] = sha256(path)
    for species, panels in sorted(inputs.panels.items()):
        for name, path in sorted(panels.items()):
            parts[f"panels/{species}/{name}"] = sha256(path)
    return parts


def run_identity(
    settings: dict[str, Any], inputs: Any, *, seed: int, world_size: int, precision: str
) -> RunIdentity:
    """The identity of a training (see the module docstring)."""
    science = science_settings(settings, world_size=world_size, precision=precision)
    parts = {
        f"settings/{key}": _digest(value)
        for key, value in {**science, "seed": seed, "format_version": FORMAT_VERSION}.items()
    }
    parts |= {
        f"inputs/{name}": digest
        for name, digest in input_digests(
            inputs, with_references=bool(settings.get("gene_types"))
        ).items()
    }
    return RunIdentity(_digest(parts)[:16], parts, science)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was saved at, from its name."""
    match = _STEP.search(path.name)
    if match is None:
        raise ValueError(f"cannot tell the step of checkpoint {path}")
    return int(match.group(1))


def checkpoints_of(run_dir: Path) -> list[Path]:
    """Periodic, decay-start and Slurm requeue (`hpc_ckpt_*`) checkpoints, oldest step first."""
    found = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.stat().st_mtime_ns))


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the most steps (the newest file among equals)."""
    found = checkpoints_of(run_dir)
    return found[-1] if found else None


def is_global_zero() -> bool:
    """Whether this process is rank 0, from the launchers' environment (before any Trainer):
    Lightning's own launcher, srun and torchrun all set one of these."""
    return all(
        int(os.environ.get(name, "0")) == 0
        for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    )


def session_token() -> str | None:
    """A name all ranks of this launch share, when they start together (srun, torchrun);
    None under Lightning's own launcher, which starts the other ranks after rank 0 set up."""
    if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}-{restart}"
    return None


def prepare_run_dir(
    run_dir: Path, identity: RunIdentity, optimizer: OptimizerConfig
) -> Path | None:
    """Make `run_dir` hold only checkpoints this run may continue from; returns the one to
    resume (None: start at step 0). Global rank 0 only; other ranks call `wait_for_run_dir`.

    Checkpoints of another identity move aside with that identity's logs, marker and export;
    checkpoints of this identity past the steps the old and new schedules share (a changed
    `max_steps`) move aside and the metrics log is trimmed to the resumed step (its full copy
    moves aside too). Nothing is deleted.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / MARKER
    previous = read_json(marker) if marker.is_file() else None
    occupied = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    occupied += sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    if previous is None or previous.get("identity") != identity.digest:
        if occupied:
            old = previous.get("identity", "unknown") if previous else "unknown"
            changed = _changed_parts(previous, identity)
            folder = _set_aside(run_dir, [*occupied, run_dir / "final"], old)
            log.info(
                "%s: the run's identity changed from %s to %s (%s): moved its files to %s; "
                "starting at step 0",
                run_dir,
                old,
                identity.digest,
                changed,
                folder,
            )
        _write_marker(marker, identity, optimizer)
        return None
    before = OptimizerConfig(
        **{**previous["optimizer"], "betas": tuple(previous["optimizer"]["betas"])}
    )
    limit = shared_steps(before, optimizer)
    stale = [p for p in checkpoints_of(run_dir) if limit is not None and checkpoint_step(p) > limit]
    if stale:
        metrics = run_dir / "logs" / "metrics.csv"
        folder = _set_aside(
            run_dir, stale, f"{identity.digest}-max_steps{before.max_steps}", copies=[metrics]
        )
        log.info(
            "%s: max_steps %d -> %d; the schedules agree up to step %d: moved %d checkpoint(s) "
            "past it to %s",
            run_dir,
            before.max_steps,
            optimizer.max_steps,
            limit,
            len(stale),
            folder,
        )
    _write_marker(marker, identity, optimizer)
    resume = newest_checkpoint(run_dir)
    trim_metrics(run_dir / "logs" / "metrics.csv", checkpoint_step(resume) if resume else 0)
    return resume


def wait_for_run_dir(
    run_dir: Path, identity: RunIdentity, *, timeout_s: float = 1800
) -> Path | None:
    """On ranks other than 0: wait until rank 0 prepared `run_dir` for this launch, then the
    checkpoint to resume (the same answer rank 0 got)."""
    token = session_token()
    marker = run_dir / MARKER
    deadline = time.monotonic() + timeout_s
    while True:
        current = read_json(marker) if marker.is_file() else {}
        ready = current.get("identity") == identity.digest and (
            token is None or current.get("session") == token
        )
        if ready:
            return newest_checkpoint(run_dir)
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not prepare {run_dir} within {timeout_s:.0f} s")
        time.sleep(0.5)


def trim_metrics(path: Path, step: int) -> None:
    """Drop the metrics logged at or after `step` (a resumed run logs them again)."""
    if not path.is_file():
        return
    frame = pl.read_csv(path, infer_schema_length=0)
    kept = frame.filter(pl.col("step").cast(pl.Int64, strict=False) < step)
    if kept.height < frame.height:
        kept.write_csv(path)


def _write_marker(marker: Path, identity: RunIdentity, optimizer: OptimizerConfig) -> None:
    write_json(
        marker,
        {
            "identity": identity.digest,
            "parts": identity.parts,
            "settings": identity.settings,
            "optimizer": asdict(optimizer),
            "session": session_token(),
        },
    )


def _changed_parts(previous: dict[str, Any] | None, identity: RunIdentity) -> str:
    if not previous or "parts" not in previous:
        return "no record of the previous identity"
    old = previous["parts"]
    names = sorted(
        name for name in set(old) | set(identity.parts) if old.get(name) != identity.parts.get(name)
    )
    return "changed: " + ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")


def _set_aside(run_dir: Path, paths: list[Path], label: str, *, copies: list[Path] = ()) -> Path:
    """Move `paths` (those that exist) and copy `copies` into `superseded/<UTC time>-<label>/`,
    keeping their places relative to `run_dir`."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = run_dir / SUPERSEDED / f"{stamp}-{label}"
    n = 1
    while folder.exists():
        n += 1
        folder = run_dir / SUPERSEDED / f"{stamp}-{label}-{n}"
    for path in copies:
        if path.exists():
            target = folder / path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    for path in paths:
        if path.exists() or path.is_symlink():
            target = folder / path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    return folder
