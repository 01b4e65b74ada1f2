"""One source of truth for defaults: the config schema. Code that mirrors config keys takes
its defaults from there, and the shipped config restates none of them differently
(issue 14, point 5)."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
import yaml

from cellfoundry.config import load_schema, schema_path, validate_config
from cellfoundry.models.encoder import EncoderConfig
from cellfoundry.models.model import ModelConfig
from cellfoundry.preprocess import PreprocessSettings
from cellfoundry.train.data import ShardDataModule
from cellfoundry.train.objectives import BinnedMLM, Contrastive, Diffusion, GeneformerMLM
from cellfoundry.train.system import OptimizerConfig
from conftest import REPO

SCHEMA = load_schema(schema_path("config"))


def section(dotted: str) -> dict[str, Any]:
    node = SCHEMA
    for part in dotted.split("."):
        node = node["properties"][part]
    return node["properties"]


def defaults_of(thing: Any) -> dict[str, Any]:
    """Defaults of a dataclass' fields or of a function's keyword arguments."""
    if dataclasses.is_dataclass(thing):
        out = {}
        for f in dataclasses.fields(thing):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out
    return {
        name: p.default
        for name, p in inspect.signature(thing).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


# Code that mirrors config keys, and the schema sections whose keys share its names.
MIRRORS = [
    (EncoderConfig, ["train.model"]),
    (OptimizerConfig, ["train.optimizer", "train"]),
    (ModelConfig, ["train", "shards"]),
    (BinnedMLM, ["train"]),
    (GeneformerMLM, ["train"]),
    (Contrastive, ["train"]),
    (Diffusion, ["train"]),
    (ShardDataModule.__init__, ["train"]),
    (PreprocessSettings, ["preprocess"]),
]
# Same name, other meaning: the objectives' `panels` are token arrays, not panel names.
NOT_MIRRORS = {"panels"}


def normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize(
    ("thing", "sections"), MIRRORS, ids=lambda x: getattr(x, "__qualname__", "")
)
def test_code_defaults_are_the_schema_defaults(thing, sections):
    compared = 0
    for name, default in defaults_of(thing).items():
        if name in NOT_MIRRORS:
            continue
        for dotted in sections:
            keys = section(dotted)
            if name in keys and "default" in keys[name]:
                assert normal(default) == keys[name]["default"], f"{dotted}.{name}"
                compared += 1
                break
    assert compared > 0


def leaves(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# What the shipped config chooses on purpose (the rest it restates for the reader).
# Choices of the shipped config: its run, its preset, and evaluation sized for the demo.
SHIPPED_CHOICES = {
    "train.run",
    "train.preset",
    "embeddings.coexpression.method",
    "eval.every_n_steps",
    "eval.n_cells",
}


def test_the_shipped_config_restates_defaults_faithfully():
    from cellfoundry.embeddings.coexpression import DEFAULTS as COEXPRESSION

    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    validate_config(shipped)
    for key, value in leaves(shipped):
        if key in SHIPPED_CHOICES:
            continue
        if key.startswith("embeddings.coexpression."):  # the method's own defaults
            assert value == COEXPRESSION[key.rsplit(".", 1)[1]], key
            continue
        node = SCHEMA
        for part in key.split("."):
            node = node["properties"][part]
        assert value == node.get("default", value), key
