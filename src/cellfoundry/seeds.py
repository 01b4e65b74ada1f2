"""Seeds that flow from the config's global seed and a name, never from run order."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *keys: str | int) -> int:
    """A 63-bit seed derived from the global `seed` and any number of keys.

    The same seed and keys give the same value on every machine and in every process;
    different keys (a dataset name, a stage name, a rank) give independent streams.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(int(seed)).encode())
    for key in keys:
        digest.update(b"\x1f")
        digest.update(str(key).encode())
    return int.from_bytes(digest.digest(), "little") >> 1


def unit_hash(seed: int, *keys: str | int) -> float:
    """A number in [0, 1) derived like `derive_seed`; used for seeded assignments."""
    return derive_seed(seed, *keys) / float(1 << 63)
