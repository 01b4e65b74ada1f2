"""Presets: one config choice away from each family's anchor model.

Precedence: the schema's defaults < the preset < what the user set (the config file and the
command line, which Snakemake merges before we see them). A preset sets everything its family
needs (objective, architecture, input layout, gene set, gene embeddings, pooling), so choosing
one from the command line alone gives that family's model; the shipped `config/config.yaml`
names the `small` preset instead of pinning model keys. Sizes follow the published models;
optimisation follows their papers where it is scale-independent (learning rate, masking), while
steps and batch size stay the config's.
"""

from __future__ import annotations

import copy
from typing import Any

# Geneformer's vocabulary: protein-coding and miRNA genes (Theodoris et al. 2023, Methods).
GENEFORMER_GENE_TYPES = ["protein_coding", "miRNA"]

PRESETS: dict[str, dict[str, Any]] = {
    # The quick start's model: the schema's small model (minutes on a CPU) with the corpus'
    # coexpression gene embeddings, trained contrastively on two independent subsamples of each
    # cell (their depths differ, so depth is no shortcut), centred, 128-token training views:
    # the setting whose cell embeddings reach PCA on the demo corpus (README, "What the small
    # default models learn about cell identity"); the binned MLM's stay at its initialisation.
    "small": {
        "objective": "contrastive",
        "contrastive_views": "subsample",
        "contrastive_center": True,
        "temperature": 0.2,
        "contrastive_view_len": 128,
        "gene_embeddings": "coexpression",
    },
    # Geneformer V1-10M (Theodoris et al. 2023): 6 layers, width 256, 4 heads, ReLU, 2,048
    # rank-ordered genes and no special token; cell embedding = mean over genes.
    "geneformer_10m": {
        "objective": "geneformer_mlm",
        "input_layout": "geneformer_v1",
        "gene_types": GENEFORMER_GENE_TYPES,
        "gene_embeddings": None,
        "pooling": "mean",
        "mask_ratio": 0.15,
        "model": {
            "d_model": 256,
            "n_layers": 6,
            "n_heads": 4,
            "d_ff": 512,
            "max_len": 2048,
            "norm_first": False,
            "activation": "relu",
            "dropout": 0.02,
            "attention_dropout": 0.02,
        },
        "optimizer": {"lr": 1.0e-3, "weight_decay": 0.001, "warmup_steps": 10_000},
    },
    # Geneformer V2-104M (Chen et al. 2024): 12 layers, width 768, 12 heads, ReLU as in every
    # published Geneformer config; <cls> + 4,094 genes + <eos> over 4,096 positions; cell
    # embedding = <cls>.
    "geneformer_106m": {
        "objective": "geneformer_mlm",
        "input_layout": "geneformer_v2",
        "gene_types": GENEFORMER_GENE_TYPES,
        "gene_embeddings": None,
        "pooling": "cls",
        "mask_ratio": 0.15,
        "model": {
            "d_model": 768,
            "n_layers": 12,
            "n_heads": 12,
            "d_ff": 3072,
            "max_len": 4096,
            "norm_first": False,
            "activation": "relu",
            "dropout": 0.02,
            "attention_dropout": 0.02,
        },
        "optimizer": {"lr": 1.0e-4, "weight_decay": 0.01, "warmup_steps": 10_000},
    },
    # scGPT whole-human: 12 layers, width 512, 8 heads, 51 bins, 1,200 genes per cell.
    "scgpt": {
        "objective": "binned_mlm",
        "input_layout": "cls",
        "mask_ratio": 0.4,
        "gene_selection": "random",
        "model": {
            "d_model": 512,
            "n_layers": 12,
            "n_heads": 8,
            "d_ff": 512,
            "max_len": 1200,
            "norm_first": True,
            "activation": "gelu",
            "dropout": 0.2,
            "attention_dropout": 0.0,
        },
        "optimizer": {"lr": 1.0e-4, "weight_decay": 0.01},
    },
    # scConcept ContrastiveModel: 8 layers, width 512, 8 heads, 1,000 rank-ordered genes.
    "scconcept": {
        "objective": "contrastive",
        "input_layout": "cls",
        "panel_max_drop_rate": 0.5,
        "model": {
            "d_model": 512,
            "n_layers": 8,
            "n_heads": 8,
            "d_ff": 1024,
            "max_len": 1000,
            "norm_first": True,
            "activation": "gelu",
            "dropout": 0.1,
            "attention_dropout": 0.0,
        },
        "optimizer": {"lr": 1.0e-4, "weight_decay": 0.0},
    },
    # SEDD small (GPT-2 small scale) over 1,024 panel genes.
    "sedd": {
        "objective": "diffusion",
        "model": {
            "d_model": 768,
            "n_layers": 12,
            "n_heads": 12,
            "d_ff": 3072,
            "max_len": 1024,
            "norm_first": True,
            "activation": "gelu",
            "dropout": 0.1,
            "attention_dropout": 0.0,
        },
        "optimizer": {"lr": 3.0e-4, "weight_decay": 0.0},
    },
}

# Presets whose export is promised to load in Hugging Face's BertForMaskedLM, and the values
# that this needs (a post-LN BERT without a gene-embedding adapter).
HF_BERT_PRESETS = ("geneformer_10m", "geneformer_106m")
HF_BERT_NEEDS = {
    "objective": "geneformer_mlm",
    "gene_embeddings": None,
    "model.norm_first": False,
}


def apply_preset(train: dict[str, Any]) -> dict[str, Any]:
    """The `train` section with its preset's values filled in under the user's."""
    name = train.get("preset")
    if not name:
        return train
    if name not in PRESETS:
        raise ValueError(
            f"train.preset: unknown preset {name!r}; presets are {', '.join(sorted(PRESETS))}"
        )
    return _merge(copy.deepcopy(PRESETS[name]), train)


def check_train_settings(train: dict[str, Any]) -> None:
    """Refuse settings that contradict each other or break what the preset promises.

    Raises ValueError with one line naming the keys.
    """
    preset = train.get("preset")
    if preset in HF_BERT_PRESETS:
        broken = [
            f"train.{key}={_get(train, key)!r}"
            for key, needed in HF_BERT_NEEDS.items()
            if _get(train, key) != needed
        ]
        if broken:
            raise ValueError(
                f"train.preset {preset} exports a Hugging Face BertForMaskedLM, which "
                f"{', '.join(broken)} would break (needs "
                + ", ".join(f"train.{k}={v!r}" for k, v in HF_BERT_NEEDS.items())
                + "); drop these settings or choose no preset"
            )
    layout = train.get("input_layout", "cls")
    if layout != "cls" and train.get("objective") != "geneformer_mlm":
        raise ValueError(
            f"train.input_layout={layout!r} is a Geneformer layout; "
            f"train.objective={train.get('objective')!r} reads cells as <cls> + genes (input_layout 'cls')"
        )
    if layout == "geneformer_v1" and train.get("pooling") == "cls":
        raise ValueError(
            "train.pooling='cls' needs a <cls> token, which train.input_layout='geneformer_v1' has not"
        )
    if train.get("dataset_alpha", 1) < 1 and train.get("length_grouped"):
        raise ValueError(
            "train.dataset_alpha < 1 repeats cells, which train.length_grouped would put "
            "in one batch; choose one of them"
        )


def _get(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values.get(part, {}) if isinstance(values, dict) else {}
    return None if values == {} else values


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        base[key] = (
            _merge(base.get(key, {}), value)
            if isinstance(value, dict) and isinstance(base.get(key), dict)
            else value
        )
    return base
