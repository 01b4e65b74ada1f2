"""Presets: one config choice away from each family's anchor model.

A preset fills the `train` section under the user's own values (anything set in the config
wins). Sizes follow the published models; optimisation follows their papers where it is
scale-independent (learning rate, masking), while steps and batch size stay the config's.
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Geneformer V1 (Theodoris et al. 2023): 6 layers, width 256, 4 heads, 2,048 rank tokens.
    "geneformer_10m": {
        "objective": "geneformer_mlm",
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
    # Geneformer V2-104M scale: 12 layers, width 768, 12 heads, at 2,048 tokens.
    "geneformer_106m": {
        "objective": "geneformer_mlm",
        "mask_ratio": 0.15,
        "model": {
            "d_model": 768,
            "n_layers": 12,
            "n_heads": 12,
            "d_ff": 3072,
            "max_len": 2048,
            "norm_first": False,
            "activation": "gelu",
            "dropout": 0.02,
            "attention_dropout": 0.02,
        },
        "optimizer": {"lr": 1.0e-4, "weight_decay": 0.01, "warmup_steps": 10_000},
    },
    # scGPT whole-human: 12 layers, width 512, 8 heads, 51 bins, 1,200 genes per cell.
    "scgpt": {
        "objective": "binned_mlm",
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


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for key, value in override.items():
        base[key] = (
            _merge(base.get(key, {}), value)
            if isinstance(value, dict) and isinstance(base.get(key), dict)
            else value
        )
    return base
