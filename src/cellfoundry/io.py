"""Small I/O helpers shared by every stage: atomic outputs, checksums, deterministic JSON."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_outputs(*paths: str | Path) -> Iterator[list[Path]]:
    """Stage outputs in temporary siblings and move them into place only on success.

    Yields one temporary path per requested output (a file or a directory, as the caller
    writes it). When the block raises, every temporary path is removed and nothing of the
    requested outputs exists afterwards, so a failed job leaves no partial output.
    """
    finals = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for final in finals:
            final.parent.mkdir(parents=True, exist_ok=True)
            # Keep the suffix: some writers (matplotlib, anndata) choose the format by it.
            fd, tmp = tempfile.mkstemp(
                prefix=f".{final.stem}.partial-", suffix=final.suffix, dir=final.parent
            )
            os.close(fd)
            os.unlink(tmp)
            temps.append(Path(tmp))
        yield temps
        for tmp, final in zip(temps, finals, strict=True):
            if not tmp.exists():
                raise FileNotFoundError(f"output {final} was not written")
        for tmp, final in zip(temps, finals, strict=True):
            remove(final)
            os.replace(tmp, final)
    except BaseException:
        for tmp in temps:
            remove(tmp)
        for final in finals:
            remove(final)
        raise


def remove(path: Path) -> None:
    """Remove a file or a directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def blake3(path: str | Path, chunk_size: int = 1 << 24) -> str:
    """Hex BLAKE3 digest of a file's bytes, on one core.

    The provenance checksum of inputs and outputs: BLAKE3 (O'Connor et al. 2020) is a
    cryptographic hash about twice as fast as SHA-256 on one core here (1.2 vs 0.55 GB/s),
    which matters when each job hashes a file of tens of gigabytes. `b3sum <file>` checks it.
    The file is read into one reused buffer (a memory map would count the whole file in the
    job's resident memory).
    """
    from blake3 import blake3 as hasher

    digest = hasher(max_threads=1)
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def sha256(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def dumps_json(obj: Any) -> str:
    """Deterministic JSON text: sorted keys, fixed indentation, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as deterministic JSON."""
    Path(path).write_text(dumps_json(obj))


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")
