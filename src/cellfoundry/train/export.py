"""The exported model: `model.safetensors`, `config.json` and the token mappings it was trained with.

Layout of an export folder::

    model.safetensors                  CellModel state dict (tied weights stored once)
    config.json                        architecture, objective, vocabulary layout, settings
    token_mappings/<species>.csv       the token mappings used (scConcept format; restricted
                                       to the model's genes when `gene_types` is set)
    gene_summaries/<species>.parquet   per-gene statistics (Geneformer medians for rank order)
    references/<species>.parquet       the gene references (symbols for `embed-cells`)
    panels/<species>/<panel>.csv       panels the objective used (contrastive, diffusion)

A run writes `model_checkpoints/<run>/exports/<identity>-step<N>/` and publishes it as
`model_checkpoints/<run>/final/` (hard links, `publish`), so that a later run under the same
name never overwrites an earlier export. `load_pretrained(folder)` rebuilds the model; its
outputs equal the trained model's. `load_bert(folder)` loads a Geneformer export as a Hugging
Face `BertForMaskedLM` and refuses any other export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_model

from cellfoundry import __version__
from cellfoundry.errors import ModelFolderError
from cellfoundry.io import read_json, remove, write_json
from cellfoundry.models.model import CellModel, ModelConfig
from cellfoundry.train.data import SPECIALS, VocabularyLayout
from cellfoundry.vocabulary import TokenMapping, read_token_mapping, write_token_mapping

if TYPE_CHECKING:
    from transformers import BertForMaskedLM

FORMAT = "cellfoundry-model"
FORMAT_VERSION = 1


def export_model(
    model: CellModel,
    layout: VocabularyLayout,
    mappings: dict[str, TokenMapping],
    out_dir: str | Path,
    *,
    metadata: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write the model folder (see module docstring), atomically, and return it.

    A BERT-shaped Geneformer model is written in the Hugging Face layout (`config.json` is a
    `BertConfig` with our keys added, weights under `BertForMaskedLM` names), so that
    `transformers.BertForMaskedLM.from_pretrained(folder)` loads it; `load_pretrained` reads
    both layouts. `extra_files` are copied in under their relative names (gene summaries for
    rank order, gene references, the panels the objective used).
    """
    final_dir = Path(out_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.partial-", dir=final_dir.parent))
    try:
        _write_export(model, layout, mappings, out_dir, metadata, extra_files or {})
        remove(final_dir)
        os.replace(out_dir, final_dir)
    except BaseException:
        remove(out_dir)
        raise
    return final_dir


def _write_export(
    model: CellModel,
    layout: VocabularyLayout,
    mappings: dict[str, TokenMapping],
    out_dir: Path,
    metadata: dict[str, Any],
    extra_files: dict[str, Path],
) -> None:
    os.chmod(out_dir, 0o755)  # mkdtemp makes owner-only folders
    model = model.to("cpu").float().eval()
    hf_config: dict[str, Any] = {}
    if is_hf_bert(model):
        from cellfoundry.models.hf import save_hf_pretrained

        save_hf_pretrained(model.encoder, model.mlm_head, out_dir)
        hf_config = read_json(out_dir / "config.json")
    else:
        save_model(model, str(out_dir / "model.safetensors"))
    os.chmod(out_dir / "model.safetensors", 0o644)  # safetensors writes owner-only files
    folder = out_dir / "token_mappings"
    folder.mkdir(exist_ok=True)
    for species, mapping in sorted(mappings.items()):
        write_token_mapping(mapping, folder / f"{species}.csv")
    for relative, path in sorted(extra_files.items()):
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out_dir / relative)
    write_json(
        out_dir / "config.json",
        {
            **hf_config,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "cellfoundry": __version__,
            "model": model.config.to_dict(),
            "vocabulary": layout.to_dict(),
            "token_mappings": {s: f"token_mappings/{s}.csv" for s in sorted(mappings)},
            **metadata,
        },
    )


def publish(export_dir: Path, final: Path) -> None:
    """Make `final` a copy of `export_dir` made of hard links (plain copies where the file
    system has none). An older `final/` whose files exist nowhere else (written before
    exports were kept) moves to `superseded/<UTC time>-final/` first; nothing is deleted."""
    staging = Path(tempfile.mkdtemp(prefix=".final.partial-", dir=final.parent))
    os.chmod(staging, 0o755)
    for source in sorted(export_dir.rglob("*")):
        target = staging / source.relative_to(export_dir)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    if final.exists():
        sole = [p for p in final.rglob("*") if p.is_file() and p.stat().st_nlink == 1]
        if sole:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            aside = final.parent / "superseded" / f"{stamp}-final"
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, aside)
        else:
            remove(final)  # links only: every file lives on in exports/
    os.replace(staging, final)


def load_pretrained(
    folder: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[CellModel, VocabularyLayout, dict[str, Any]]:
    """The exported model (in eval mode), its vocabulary layout and its config.

    Raises
    ------
    ModelFolderError
        One line, when `folder` holds no export (`read_export_config`).
    """
    folder = Path(folder)
    config = read_export_config(folder)
    # Frozen gene embeddings, if any, are a buffer of the state dict: load_model fills them.
    model = CellModel(ModelConfig.from_dict(config["model"]))
    if config.get("model_type") == "bert":
        from cellfoundry.models.hf import load_bert_state_dict

        load_bert_state_dict(model.encoder, model.mlm_head, load_file(folder / "model.safetensors"))
        model.to(device)
    else:
        load_model(model, str(folder / "model.safetensors"), device=str(device))
    mappings = load_token_mappings(folder, config)
    specials = config.get("vocabulary", {}).get("specials", SPECIALS)
    layout = VocabularyLayout.from_mappings(mappings, specials=specials)
    return model.eval(), layout, config


def read_export_config(folder: str | Path) -> dict[str, Any]:
    """The `config.json` of an exported model folder.

    Raises
    ------
    ModelFolderError
        One line naming the folder, when it has no `config.json` or is no cellfoundry export.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelFolderError(
            f"{folder}: no exported model here (no config.json); the training rule writes "
            "model_checkpoints/<run>/final/"
        )
    config = read_json(folder / "config.json")
    if config.get("format") != FORMAT:
        raise ModelFolderError(
            f"{folder} is not a cellfoundry model folder (config.json format {config.get('format')!r})"
        )
    return config


def load_bert(folder: str | Path) -> BertForMaskedLM:
    """A Geneformer export as a Hugging Face `transformers.BertForMaskedLM` (eval mode, CPU).

    Only a model that is exactly a BERT (`geneformer_mlm`, post-LN, no value or gene-embedding
    input: the `geneformer_10m` and `geneformer_106m` presets) is exported in the Hugging Face
    layout (`is_hf_bert`). `BertForMaskedLM.from_pretrained` on any other export returns a
    randomly initialised BERT with a warning that every weight is missing or unexpected; this
    refuses instead, and also when the weights do not fill the BERT exactly.

    Raises
    ------
    ModelFolderError
        One line naming the folder and the model it holds.
    """
    folder = Path(folder)
    config = read_export_config(folder)
    if config.get("model_type") != "bert":
        raise ModelFolderError(
            f"{folder} is not a BERT export: it holds a {config.get('objective', '?')} model "
            "(only Geneformer runs, train.preset geneformer_10m or geneformer_106m, export a "
            "BertForMaskedLM); load it with cellfoundry.train.export.load_pretrained"
        )
    from cellfoundry.models.hf import require_transformers

    require_transformers()
    from transformers import BertForMaskedLM

    model, info = BertForMaskedLM.from_pretrained(folder, output_loading_info=True)
    problems = {
        key: sorted(info.get(key) or [])[:3]
        for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
        if info.get(key)
    }
    if problems:
        raise ModelFolderError(f"{folder}: the weights do not fill a BertForMaskedLM: {problems}")
    return model.eval()


def is_hf_bert(model: CellModel) -> bool:
    """Whether the model is exactly a Hugging Face `BertForMaskedLM` (Geneformer family)."""
    return model.mlm_head is not None and model.config.encoder.is_bert_compatible


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
