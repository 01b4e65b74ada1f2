"""Training objectives: how a batch of cells becomes model inputs (`collate`) and a loss (`loss`).

Each objective pairs a tokenization of the anchors' family (`notes/formats.md` section 3) with
the loss math of `cellfoundry.models.objectives`. `collate` runs in the data loader on CPU with
a seeded numpy Generator; `loss` runs in the training step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cellfoundry.loader import SparseBatch
from cellfoundry.models import objectives as math
from cellfoundry.models.model import CellModel
from cellfoundry.train.data import (
    SplitData,
    VocabularyLayout,
    as_model_batch,
    global_tokens,
    pack,
    select_entries,
)


def _generator(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def _with_cls(
    lengths: np.ndarray, *columns: tuple[np.ndarray, int]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Prepend one position per cell holding the given fill value to each packed column."""
    cu = pack(lengths + 1)
    out = []
    for values, fill in columns:
        array = np.full(int(cu[-1]), fill, dtype=values.dtype)
        body = np.ones(int(cu[-1]), dtype=bool)
        body[cu[:-1]] = False
        array[body] = values
        out.append(array)
    return cu, out


@dataclass
class BinnedMLM:
    """scGPT-style masked value modeling: gene tokens + value-bin tokens, predict masked bins.

    A cell becomes `<cls>` followed by up to `max_len - 1` of its expressed genes (a random
    subset when it has more, as scGPT samples genes; or its highest counts with
    `gene_selection='top'`), each with its quantile bin. A fraction `mask_ratio` of gene
    positions get the MASK value state; the loss is the cross-entropy of their original bins.
    """

    max_len: int
    n_bins: int
    mask_ratio: float = 0.15
    gene_selection: str = "random"
    padding_free: bool = False

    name: ClassVar[str] = "binned_mlm"
    within_dataset: ClassVar[bool] = False

    def collate(
        self, batch: SparseBatch, data: SplitData, rng: np.random.Generator
    ) -> dict[str, Tensor]:
        layout: VocabularyLayout = data.layout
        if self.gene_selection == "top":
            order = _by_count_desc(batch)
            chosen = order[select_entries(batch.offsets, self.max_len - 1, None)]
        else:
            chosen = select_entries(batch.offsets, self.max_len - 1, rng)
        lengths = np.minimum(batch.lengths, self.max_len - 1)
        tokens = global_tokens(batch, data)[chosen]
        bins = batch.bins[chosen].astype(np.int64)
        cu, (tokens, values) = _with_cls(lengths, (tokens, layout.cls_id), (bins, 0))
        special = np.zeros(len(tokens), dtype=bool)
        special[cu[:-1]] = True
        inputs, targets, mask = math.mask_values(
            torch.from_numpy(values),
            torch.from_numpy(special),
            mask_ratio=self.mask_ratio,
            mask_value_id=self.n_bins,
            generator=_generator(rng),
        )
        flat = {
            "tokens": tokens,
            "values": inputs.numpy(),
            "targets": targets.numpy(),
            "loss_mask": mask.numpy(),
        }
        return as_model_batch(
            flat, cu, padding_free=self.padding_free, pad={"tokens": layout.pad_id}
        )

    def loss(self, model: CellModel, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden = model.encode(batch)
        mask = batch["loss_mask"]
        logits = model.value_head(hidden, mask)
        loss, accuracy = math.masked_cross_entropy(logits, batch["targets"][mask])
        return {"loss": loss, "accuracy": accuracy}

    def model_options(self) -> dict[str, Any]:
        """What the encoder needs for this tokenization."""
        return {"n_values": self.n_bins + 1, "position": "none"}


def _by_count_desc(batch: SparseBatch) -> np.ndarray:
    """Entry indices reordered so that each row lists its highest counts first."""
    rows = np.repeat(np.arange(len(batch)), batch.lengths)
    return np.lexsort((-batch.counts.astype(np.int64), rows))


OBJECTIVES = {BinnedMLM.name: BinnedMLM}


def make_objective(name: str, **settings: Any) -> Any:
    """The objective called `name` with its settings."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**settings)
