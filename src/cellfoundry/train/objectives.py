"""Training objectives: how a batch of cells becomes model inputs (`collate`) and a loss (`loss`).

Each objective pairs a tokenization of one family of the field (`notes/formats.md` section 3)
with the loss math of `cellfoundry.models.losses`:

- `binned_mlm`: scGPT-style gene + value-bin tokens, masked value modeling;
- `geneformer_mlm`: Geneformer rank-value tokens, masked gene modeling (15%, 80/10/10);
- `contrastive`: scConcept's two gene views of a cell (a panel with genes dropped / the rest),
  CLIP loss with a learnable temperature, embeddings gathered across ranks;
- `diffusion`: SEDD absorbing-state masked discrete diffusion over the bins of a fixed gene
  panel (every gene a position, zeros included), log-linear noise.

`collate(batch, data, noise, train=...)` runs in the data loader on CPU; every random draw
comes from `noise` (`CellNoise`), a function of (seed, batch number, cell, position), so a
cell is tokenized and masked the same way on any number of ranks. With `train=False` it is
deterministic and corrupts nothing (cell embeddings).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cellfoundry.config import schema_default
from cellfoundry.loader import SparseBatch
from cellfoundry.models import losses
from cellfoundry.models.model import CellModel
from cellfoundry.train.data import (
    CellNoise,
    SplitData,
    as_model_batch,
    global_tokens,
    pack,
    select_entries,
)


def _with_cls(
    lengths: np.ndarray, *columns: tuple[np.ndarray, int]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Prepend one position per cell holding the given fill value to each packed column."""
    cu, out, _ = _with_specials(lengths, *[(values, fill, None) for values, fill in columns])
    return cu, out


def _with_specials(
    lengths: np.ndarray, *columns: tuple[np.ndarray, int | None, int | None]
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Frame each cell of packed columns with a first and/or a last special position.

    Each column is (values, head fill, tail fill); None leaves that position out (the same
    for every column). Returns cu_seqlens, the framed columns and the special positions.
    """
    head = columns[0][1] is not None
    tail = columns[0][2] is not None
    cu = pack(lengths + int(head) + int(tail))
    special = np.zeros(int(cu[-1]), dtype=bool)
    if head:
        special[cu[:-1]] = True
    if tail:
        special[cu[1:] - 1] = True
    out = []
    for values, head_fill, tail_fill in columns:
        array = np.empty(int(cu[-1]), dtype=values.dtype)
        array[~special] = values
        if head:
            array[cu[:-1]] = head_fill
        if tail:
            array[cu[1:] - 1] = tail_fill
        out.append(array)
    return cu, out, special


def _ranked_in_groups(keys: np.ndarray, groups: np.ndarray, limit: int) -> np.ndarray:
    """Entry indices ordered by group, then by `keys` descending (ties by entry index),
    keeping at most `limit` per group."""
    order = np.lexsort((np.arange(len(keys)), -keys, groups))
    grouped = groups[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    lengths = np.diff(np.r_[starts, len(order)])
    rank = np.arange(len(order)) - np.repeat(starts, lengths)
    return order[rank < limit]


@dataclass
class BinnedMLM:
    """scGPT-style masked value modeling: gene tokens + value-bin tokens, predict masked bins.

    A cell becomes `<cls>` followed by up to `max_len - 1` of its expressed genes (a random
    subset when it has more, as scGPT samples genes, or its highest counts with
    `gene_selection='top'`), each with its quantile bin. A fraction `mask_ratio` of gene
    positions get the MASK value state; the loss is the cross-entropy of their original bins.
    """

    max_len: int
    n_bins: int
    mask_ratio: float = schema_default("train.mask_ratio")
    gene_selection: str = schema_default("train.gene_selection")
    padding_free: bool = schema_default("train.padding_free")

    name: ClassVar[str] = "binned_mlm"
    within_dataset: ClassVar[bool] = False

    def model_options(self) -> dict[str, Any]:
        """What the encoder needs for this tokenization."""
        return {"n_values": self.n_bins + 1, "position": "none"}

    def collate(
        self, batch: SparseBatch, data: SplitData, noise: CellNoise, *, train: bool = True
    ) -> dict[str, Tensor]:
        layout = data.layout
        if self.gene_selection == "top" or not train:
            rows = np.repeat(np.arange(len(batch)), batch.lengths)
            chosen = np.sort(
                _ranked_in_groups(batch.counts.astype(np.float64), rows, self.max_len - 1)
            )
        else:
            chosen = select_entries(
                batch.offsets, self.max_len - 1, noise.for_rows(batch.lengths).entries().numpy()
            )
        lengths = np.minimum(batch.lengths, self.max_len - 1)
        tokens = global_tokens(batch, data)[chosen]
        bins = batch.bins[chosen].astype(np.int64)
        cu, (tokens, values) = _with_cls(lengths, (tokens, layout.cls_id), (bins, 0))
        special = np.zeros(len(tokens), dtype=bool)
        special[cu[:-1]] = True
        if train:
            inputs, targets, mask = losses.mask_values(
                torch.from_numpy(values),
                torch.from_numpy(special),
                mask_ratio=self.mask_ratio,
                mask_value_id=self.n_bins,
                generator=noise.for_rows(lengths + 1).entries,
            )
            values, targets, mask = inputs.numpy(), targets.numpy(), mask.numpy()
        else:
            targets, mask = values, np.zeros(len(values), dtype=bool)
        flat = {"tokens": tokens, "values": values, "targets": targets, "loss_mask": mask}
        return as_model_batch(
            flat, cu, padding_free=self.padding_free, pad={"tokens": layout.pad_id}
        )

    def loss(self, model: CellModel, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden = model.encode(batch)
        mask = batch["loss_mask"]
        targets = batch["targets"][mask]
        logits = model.value_head(hidden, mask)
        loss, accuracy = losses.masked_cross_entropy(logits, targets)
        out = {"loss": loss, "accuracy": accuracy, "count": mask.sum()}
        if model.cell_head is not None:
            # scGPT's GEPC: the masked genes' bins again, this time from the cell embedding alone.
            cell = model.pool(hidden, batch)[_cell_of_positions(batch)[mask]]
            cell_loss, cell_accuracy = losses.masked_cross_entropy(
                model.predict_from_cell(cell, batch["tokens"][mask]), targets
            )
            out |= {
                "loss": loss + cell_loss,
                "mlm_loss": loss,
                "cell_loss": cell_loss,
                "cell_accuracy": cell_accuracy,
            }
        return out


def _cell_of_positions(batch: dict[str, Tensor]) -> Tensor:
    """The cell (row) of every position, in the batch's layout."""
    tokens = batch["tokens"]
    if "cu_seqlens" in batch:
        from cellfoundry.models.attention import varlen_index

        return varlen_index(batch["cu_seqlens"], tokens.shape[0])[0]
    return torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(tokens)


@dataclass
class GeneformerMLM:
    """Geneformer: rank-value encoding and masked gene modeling.

    Each cell's genes are ranked by count / cell total x 10,000 / the gene's non-zero median
    over the species' corpus (applied by the loader) and the top ones fill the input layout:
    `cls` = `<cls>` + `max_len - 1` genes; `geneformer_v1` = `max_len` genes and no special
    token (Geneformer V1, 2,048); `geneformer_v2` = `<cls>` + `max_len - 2` genes + `<eos>`
    (Geneformer V2, 4,096). 15% of gene positions are masked BERT-style (80% `<mask>`, 10% a
    random gene, 10% unchanged); the loss is the cross-entropy of the original gene token.
    """

    max_len: int
    n_bins: int
    mask_ratio: float = schema_default("train.mask_ratio")
    padding_free: bool = schema_default("train.padding_free")
    input_layout: str = schema_default("train.input_layout")

    name: ClassVar[str] = "geneformer_mlm"
    within_dataset: ClassVar[bool] = False

    def model_options(self) -> dict[str, Any]:
        return {"n_values": 0, "position": "learned"}

    @property
    def n_genes(self) -> int:
        """Genes per cell at most (`max_len` less the layout's special tokens)."""
        return self.max_len - {"cls": 1, "geneformer_v1": 0, "geneformer_v2": 2}[self.input_layout]

    def collate(
        self, batch: SparseBatch, data: SplitData, noise: CellNoise, *, train: bool = True
    ) -> dict[str, Tensor]:
        layout = data.layout
        offsets, ranked = data.collection.rank_batch(batch, max_len=self.n_genes)
        lengths = np.diff(offsets)
        tokens = ranked.astype(np.int64)  # already the model's token ids (loader.TokenSpace)
        head = None if self.input_layout == "geneformer_v1" else layout.cls_id
        tail = layout.eos_id if self.input_layout == "geneformer_v2" else None
        cu, (tokens,), special = _with_specials(lengths, (tokens, head, tail))
        if train:
            inputs, _, mask = losses.mask_tokens_bert(
                torch.from_numpy(tokens),
                torch.from_numpy(special),
                mask_ratio=self.mask_ratio,
                mask_token_id=layout.mask_id,
                vocab_low=layout.n_specials,
                vocab_high=layout.n_tokens,
                generator=noise.for_rows(np.diff(cu)).entries,
            )
            flat = {"tokens": inputs.numpy(), "targets": tokens, "loss_mask": mask.numpy()}
        else:
            flat = {
                "tokens": tokens,
                "targets": tokens,
                "loss_mask": np.zeros(len(tokens), dtype=bool),
            }
        return as_model_batch(
            flat, cu, padding_free=self.padding_free, pad={"tokens": layout.pad_id}
        )

    def loss(self, model: CellModel, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        hidden = model.encode(batch)
        mask = batch["loss_mask"]
        logits = model.mlm_head(hidden, mask)
        loss, accuracy = losses.masked_cross_entropy(logits, batch["targets"][mask])
        return {"loss": loss, "accuracy": accuracy, "count": mask.sum()}


@dataclass
class Contrastive:
    """scConcept: a CLIP-style loss between two gene views of each cell.

    View A takes the cell's expressed genes that lie in one of its species' panels (chosen at
    random per cell), with a random share of up to `panel_max_drop_rate` of them dropped; view
    B takes the cell's remaining expressed genes. Each view is `<cls>` followed by its genes
    sorted by count (rank encoding: the order is the position), truncated to `max_len`. Batches
    hold one dataset at a time; embeddings are gathered across ranks before the loss.

    `panels` maps a species to its panels as arrays of the model's token ids.

    With `views='subsample'` the two views are instead independent subsamples of the cell's
    expressed genes, each keeping a share drawn per cell and view from U(`keep_min`, 1), so
    the views' gene counts differ and a cell's depth is not a feature both views share
    exactly. `center` subtracts each view's mean over the (gathered) batch from its
    embeddings before the loss; `rank='normalised'` orders a view's genes by count / the
    gene's corpus non-zero median (Geneformer's rank value) instead of by count.
    `view_len` caps a training view at that many tokens (`<cls>` included; None = `max_len`),
    which makes a step cheaper; the cell embedding (one view: the whole cell) keeps `max_len`.
    """

    max_len: int
    n_bins: int
    panels: Mapping[str, list[np.ndarray]] = field(default_factory=dict)
    panel_max_drop_rate: float = schema_default("train.panel_max_drop_rate")
    views: str = schema_default("train.contrastive_views")
    center: bool = schema_default("train.contrastive_center")
    keep_min: float = schema_default("train.contrastive_keep_min")
    rank: str = schema_default("train.contrastive_rank")
    view_len: int | None = schema_default("train.contrastive_view_len")
    padding_free: bool = schema_default("train.padding_free")

    name: ClassVar[str] = "contrastive"
    within_dataset: ClassVar[bool] = True

    def model_options(self) -> dict[str, Any]:
        # scConcept's rank encoding: a gene's place in the count order is its position.
        # Centring cancels the final norm's bias (a shift common to all cells): leave it out.
        return {"n_values": 0, "position": "learned", "final_norm_bias": not self.center}

    def collate(
        self, batch: SparseBatch, data: SplitData, noise: CellNoise, *, train: bool = True
    ) -> dict[str, Any]:
        layout = data.layout
        n = len(batch)
        rows = np.repeat(np.arange(n), batch.lengths)
        tokens = global_tokens(batch, data)
        counts = batch.counts.astype(np.float64)
        if self.rank == "normalised":
            # Geneformer's order: count / the gene's non-zero median over the corpus (the cell
            # total is common to a cell's genes); genes without a median come last.
            median = data.collection.gene_medians(batch.tokens)
            counts = np.where(median > 0, counts / np.where(median > 0, median, 1.0), 0.0)
        if not train:  # one view: the whole cell, for cell embeddings
            return self._view(
                tokens, counts, rows, np.ones(len(tokens), bool), n, layout, self.max_len
            )
        view_len = min(self.view_len or self.max_len, self.max_len)
        if self.views == "subsample":
            # Two independent subsamples, each keeping a share ~ U(keep_min, 1) of the cell's
            # expressed genes: the views' gene counts differ, so depth is not shared exactly.
            keep_a = self.keep_min + (1 - self.keep_min) * noise.cells_uniform().numpy()
            keep_b = self.keep_min + (1 - self.keep_min) * noise.cells_uniform().numpy()
            noise.for_rows(batch.lengths)
            view_a = noise.entries().numpy() < keep_a[rows]
            view_b = noise.entries().numpy() < keep_b[rows]
            return {
                "a": self._view(tokens, counts, rows, view_a, n, layout, view_len),
                "b": self._view(tokens, counts, rows, view_b, n, layout, view_len),
            }
        in_panel = np.zeros(len(tokens), dtype=bool)
        species_of_cell = data.species[batch.shard]
        cell_u = noise.cells_uniform().numpy()
        for cell_species in np.unique(species_of_cell):
            panels = self.panels.get(cell_species) or []
            if not panels:
                raise ValueError(f"contrastive training needs panels for {cell_species}")
            cells = np.flatnonzero(species_of_cell == cell_species)
            choice = (cell_u[cells] * len(panels)).astype(np.int64)
            for p, panel in enumerate(panels):
                members = np.isin(rows, cells[choice == p])
                in_panel[members] = np.isin(tokens[members], panel)
        drop = noise.cells_uniform().numpy() * self.panel_max_drop_rate
        view_a = in_panel & (noise.for_rows(batch.lengths).entries().numpy() >= drop[rows])
        return {
            "a": self._view(tokens, counts, rows, view_a, n, layout, view_len),
            "b": self._view(tokens, counts, rows, ~view_a, n, layout, view_len),
        }

    def _view(self, tokens, counts, rows, keep, n, layout, length) -> dict[str, Tensor]:
        """`<cls>` + the kept genes of each cell in descending count order, up to `length`."""
        entries = np.flatnonzero(keep)
        chosen = entries[_ranked_in_groups(counts[entries], rows[entries], length - 1)]
        lengths = np.bincount(rows[chosen], minlength=n)
        cu, (view_tokens,) = _with_cls(lengths, (tokens[chosen], layout.cls_id))
        return as_model_batch(
            {"tokens": view_tokens},
            cu,
            padding_free=self.padding_free,
            pad={"tokens": layout.pad_id},
        )

    def loss(self, model: CellModel, batch: dict[str, Any]) -> dict[str, Tensor]:
        z_a = losses.gather_with_grad(model.cell_embedding(batch["a"]))
        z_b = losses.gather_with_grad(model.cell_embedding(batch["b"]))
        # Every rank gathers equal shapes (padded validation batches); padding cells drop out.
        valid = _cell_mask(batch, len(z_a) // _world_size(), z_a.device)
        valid = losses.gather_with_grad(valid.float()).bool()
        z_a, z_b = z_a[valid], z_b[valid]
        if self.center:
            z_a, z_b = z_a - z_a.mean(0), z_b - z_b.mean(0)
        loss = losses.clip_loss(z_a, z_b, model.logit_scale)
        with torch.no_grad():
            similarity = (
                torch.nn.functional.normalize(z_a.float(), dim=-1)
                @ torch.nn.functional.normalize(z_b.float(), dim=-1).T
            )
            accuracy = (
                (similarity.argmax(1) == torch.arange(len(z_a), device=z_a.device)).float().mean()
            )
        return {
            "loss": loss,
            "accuracy": accuracy,
            "temperature": 1 / model.logit_scale.detach().exp(),
        }


@dataclass
class Diffusion:
    """SEDD masked discrete diffusion (absorbing state) over binned expression.

    Every gene of a fixed panel per species (the first `max_len` genes of `panels[species][0]`,
    the HVG panel by default) is a position, zeros included; values are bin ids and the
    absorbing state is `n_bins`. A time t is drawn per cell (low-discrepancy over the batch),
    sigma(t) = -log(1 - (1 - eps) t), each position is absorbed with probability
    1 - exp(-sigma), and the loss is SEDD's score entropy on absorbed positions, weighted by
    dsigma (`cellfoundry.models.losses.sedd_score_entropy_loss`). Batches hold one dataset,
    hence one panel.
    """

    max_len: int
    n_bins: int
    panels: Mapping[str, list[np.ndarray]] = field(default_factory=dict)
    noise_eps: float = 1e-3
    padding_free: bool = schema_default("train.padding_free")

    name: ClassVar[str] = "diffusion"
    within_dataset: ClassVar[bool] = True

    def model_options(self) -> dict[str, Any]:
        return {"n_values": self.n_bins + 1, "position": "none"}

    def positions(self, species: str) -> np.ndarray:
        """Model token ids of the genes that are positions for `species`."""
        panels = self.panels.get(species) or []
        if not panels:
            raise ValueError(f"diffusion training needs a gene panel for {species}")
        return np.asarray(panels[0][: self.max_len], dtype=np.int64)

    def collate(
        self, batch: SparseBatch, data: SplitData, noise: CellNoise, *, train: bool = True
    ) -> dict[str, Tensor]:
        species = np.unique(data.species[batch.shard])
        if len(species) != 1:
            raise ValueError("diffusion batches must hold one species")
        genes = self.positions(species[0])
        column = np.full(data.layout.n_tokens, -1, dtype=np.int64)
        column[genes] = np.arange(len(genes))
        tokens = global_tokens(batch, data)
        rows = np.repeat(np.arange(len(batch)), batch.lengths)
        cols = column[tokens]
        dense = np.zeros((len(batch), len(genes)), dtype=np.int64)
        dense[rows[cols >= 0], cols[cols >= 0]] = batch.bins[cols >= 0]
        out = {
            "tokens": torch.from_numpy(np.broadcast_to(genes, dense.shape).copy()),
            "values": torch.from_numpy(dense),
            "padding_mask": torch.zeros(dense.shape, dtype=torch.bool),
        }
        if train:
            # t per cell (not stratified over the batch, which would tie a cell to its batch mates).
            t = losses.sample_diffusion_times(
                len(batch), eps=self.noise_eps, generator=noise.cells_uniform
            )
            sigma, dsigma = losses.loglinear_noise(t, eps=self.noise_eps)
            noise.for_rows(np.full(len(batch), len(genes)))
            absorbed = losses.absorb(
                out["values"].reshape(-1),
                sigma.repeat_interleave(len(genes)),
                mask_value_id=self.n_bins,
                generator=noise.entries,
            )
            out |= {
                "targets": out["values"],
                "sigma": sigma,
                "dsigma": dsigma,
                "values": absorbed.reshape(dense.shape),
            }
        return out

    def loss(self, model: CellModel, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        condition = model.time_embedding(batch["sigma"])
        output = model.value_head(model.encode(batch, condition=condition))
        log_score = losses.sedd_log_score(output, batch["sigma"])
        per_position = losses.sedd_score_entropy_loss(
            log_score,
            batch["values"],
            batch["targets"],
            batch["sigma"],
            batch["dsigma"],
            mask_value_id=self.n_bins,
            reduction="none",
        )
        valid = _cell_mask(batch, len(batch["values"]), per_position.device)
        # SEDD's mean over cells, over real cells only (validation pads with copies).
        loss = per_position[valid].sum() / valid.sum().clamp_min(1)
        absorbed = (batch["values"] == self.n_bins) & valid[:, None]
        with torch.no_grad():
            accuracy = (output.argmax(-1)[absorbed] == batch["targets"][absorbed]).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    def sample(
        self,
        model: CellModel,
        species: str,
        n_cells: int,
        *,
        steps: int = 64,
        seed: int = 0,
        layout_tokens: np.ndarray | None = None,
    ) -> np.ndarray:
        """Generate `n_cells` cells (bin ids over the species' positions) by reverse diffusion."""
        genes = torch.from_numpy(
            self.positions(species) if layout_tokens is None else layout_tokens
        )
        device = next(model.parameters()).device
        tokens = genes.to(device).expand(n_cells, -1)
        padding = torch.zeros(tokens.shape, dtype=torch.bool, device=device)

        def model_fn(x: Tensor, sigma: Tensor) -> Tensor:
            sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
            batch = {"tokens": tokens, "values": x, "padding_mask": padding}
            return losses.sedd_log_score(
                model.value_head(model.encode(batch, condition=model.time_embedding(sigma))), sigma
            )

        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.inference_mode():
            cells = losses.sample_absorbing(
                model_fn,
                len(genes),
                steps,
                mask_value_id=self.n_bins,
                n_cells=n_cells,
                noise_eps=self.noise_eps,
                generator=generator,
                device=device,
            )
        return cells.cpu().numpy()


def _cell_mask(batch: dict[str, Any], n: int, device: torch.device) -> Tensor:
    """True for the real cells of a batch (all of them when it has no `cell_mask`)."""
    mask = batch.get("cell_mask")
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return mask.to(device)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


OBJECTIVES = {o.name: o for o in (BinnedMLM, GeneformerMLM, Contrastive, Diffusion)}


def make_objective(name: str, **settings: Any) -> Any:
    """The objective called `name` with the settings it takes (others are ignored)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in settings.items() if k in fields})
