"""Functions run in spawned worker processes by tests: importing this module stays cheap."""

from __future__ import annotations

import numpy as np

from cellfoundry.loader import ShardCollection


def gather_in_worker(collection: ShardCollection, cells: np.ndarray) -> list[np.ndarray]:
    """A pickled collection's batch, gathered in the worker."""
    batch = collection.gather(cells)
    return [batch.offsets, batch.tokens, batch.counts, batch.bins]
