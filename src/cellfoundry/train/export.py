"""The exported model: `model.safetensors`, `config.json` and the token mappings it was trained with.

Layout of `<project>/model_checkpoints/<run>/final/`::

    model.safetensors             CellModel state dict (tied weights stored once)
    config.json                   architecture, objective, vocabulary layout, training settings
    token_mappings/<species>.csv  the token mappings used (scConcept format)

`load_pretrained(folder)` rebuilds the model; its outputs equal the trained model's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from cellfoundry import __version__
from cellfoundry.io import read_json, write_json
from cellfoundry.models.model import CellModel, ModelConfig
from cellfoundry.train.data import VocabularyLayout
from cellfoundry.vocabulary import TokenMapping, read_token_mapping

FORMAT = "cellfoundry-model"
FORMAT_VERSION = 1


def export_model(
    model: CellModel,
    layout: VocabularyLayout,
    token_mapping_paths: dict[str, Path],
    out_dir: str | Path,
    *,
    metadata: dict[str, Any],
) -> Path:
    """Write the model folder (see module docstring) and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").float().eval()
    save_model(model, str(out_dir / "model.safetensors"))
    folder = out_dir / "token_mappings"
    folder.mkdir(exist_ok=True)
    for species, path in sorted(token_mapping_paths.items()):
        shutil.copyfile(path, folder / f"{species}.csv")
    write_json(
        out_dir / "config.json",
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "cellfoundry": __version__,
            "model": model.config.to_dict(),
            "vocabulary": layout.to_dict(),
            "token_mappings": {s: f"token_mappings/{s}.csv" for s in sorted(token_mapping_paths)},
            **metadata,
        },
    )
    return out_dir


def load_pretrained(
    folder: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[CellModel, VocabularyLayout, dict[str, Any]]:
    """The exported model (in eval mode), its vocabulary layout and its config."""
    folder = Path(folder)
    config = read_json(folder / "config.json")
    if config.get("format") != FORMAT:
        raise ValueError(
            f"{folder} is not a cellfoundry model folder (config.json format {config.get('format')!r})"
        )
    # Frozen gene embeddings, if any, are a buffer of the state dict: load_model fills them.
    model = CellModel(ModelConfig.from_dict(config["model"]))
    load_model(model, str(folder / "model.safetensors"), device=str(device))
    mappings = load_token_mappings(folder, config)
    layout = VocabularyLayout.from_mappings(mappings)
    return model.eval(), layout, config


def load_token_mappings(folder: str | Path, config: dict[str, Any]) -> dict[str, TokenMapping]:
    return {s: read_token_mapping(s, Path(folder) / p) for s, p in config["token_mappings"].items()}


def gene_embedding_matrix(
    layout: VocabularyLayout, mappings: dict[str, TokenMapping], csvs: dict[str, Path]
) -> tuple[np.ndarray, dict[str, int]]:
    """Rows of every model token from per-species gene-embedding CSVs (zeros where missing).

    Returns the matrix [n_tokens, dim] and, per species, how many vocabulary genes had a vector.
    """
    from cellfoundry.embeddings import read_csv

    matrix: np.ndarray | None = None
    found: dict[str, int] = {}
    for species, path in sorted(csvs.items()):
        ids, vectors = read_csv(path)
        if matrix is None:
            matrix = np.zeros((layout.n_tokens, vectors.shape[1]), dtype=np.float32)
        elif vectors.shape[1] != matrix.shape[1]:
            raise ValueError(
                f"gene embeddings of {species} have {vectors.shape[1]} dimensions, not {matrix.shape[1]}"
            )
        local = mappings[species].tokens(ids)
        known = (local >= 0) & np.any(vectors != 0, axis=1)
        rows = layout.local_to_global[species][local[known]]
        matrix[rows] = vectors[known]
        found[species] = int(known.sum())
    if matrix is None:
        raise ValueError("no gene-embedding file given")
    return matrix, found
