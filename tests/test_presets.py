"""Presets: chosen from the command line alone they give their family's model (the schema's
defaults < the preset < what the user set); Geneformer presets keep their promise of a
Hugging Face BertForMaskedLM, with Geneformer's input layout and gene set (issues 12.1, 12.3,
14.4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from snakemake.cli import parse_config
from snakemake.utils import update_config

from cellfoundry.config import ConfigError, validate_config
from cellfoundry.train.data import CellNoise
from cellfoundry.train.export import load_pretrained
from cellfoundry.train.presets import GENEFORMER_GENE_TYPES, PRESETS
from cellfoundry.train.run import TrainInputs, build, train
from conftest import REPO
from test_train import settings


def from_command_line(*entries: str) -> dict:
    """The config Snakemake builds from the shipped config.yaml and `--config` entries,
    validated as the workflow validates it."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, parse_config(list(entries)))
    return validate_config(config)


def test_a_preset_on_the_command_line_beats_the_defaults_and_loses_to_the_user():
    shipped = from_command_line()["train"]
    assert shipped["preset"] == "small" and shipped["objective"] == "contrastive"
    assert (shipped["contrastive_views"], shipped["contrastive_center"]) == ("subsample", True)
    assert (shipped["temperature"], shipped["contrastive_view_len"]) == (0.2, 128)
    assert shipped["gene_embeddings"] == "coexpression"
    # Without the preset, the schema's defaults: the binned MLM.
    assert from_command_line("train={preset: null}")["train"]["objective"] == "binned_mlm"

    geneformer = from_command_line("train={preset: geneformer_10m}")["train"]
    model = geneformer["model"]
    assert geneformer["objective"] == "geneformer_mlm" and geneformer["gene_embeddings"] is None
    assert (model["d_model"], model["n_layers"], model["max_len"], model["norm_first"]) == (
        256,
        6,
        2048,
        False,
    )
    assert geneformer["input_layout"] == "geneformer_v1"
    assert geneformer["gene_types"] == GENEFORMER_GENE_TYPES
    assert geneformer["run"] == "demo"  # the config's own values stay

    # The command: `null` arrives as text and is read as YAML's null.
    explicit = from_command_line("train={preset: geneformer_10m, gene_embeddings: null}")
    assert explicit["train"]["gene_embeddings"] is None
    # What the user sets for this run wins over the preset.
    mine = from_command_line("train={preset: geneformer_106m, model: {max_len: 512}}")["train"]
    assert mine["model"]["max_len"] == 512 and mine["model"]["d_model"] == 768
    assert mine["input_layout"] == "geneformer_v2"
    steps = from_command_line("train={max_steps: 50}")["train"]
    assert steps["max_steps"] == 50 and steps["preset"] == "small"
    none = from_command_line("train={preset: null}")["train"]
    assert none["preset"] is None and none["gene_embeddings"] is None
    with pytest.raises(ConfigError, match="dataset_alpha < 1 repeats cells"):
        from_command_line("train={dataset_alpha: 0.5, length_grouped: true}")


def test_the_shipped_config_pins_no_key_a_preset_sets():
    train = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["train"]
    preset_keys = {key for preset in PRESETS.values() for key in preset} - {"preset"}
    assert not preset_keys & set(train), sorted(preset_keys & set(train))


def test_geneformer_presets_refuse_settings_that_break_the_bert_export():
    with pytest.raises(ConfigError) as error:
        from_command_line(
            "train={preset: geneformer_10m, gene_embeddings: coexpression, "
            "model: {norm_first: true}}"
        )
    message = str(error.value)
    assert "\n" not in message
    assert "train.gene_embeddings='coexpression'" in message
    assert "train.model.norm_first=True" in message and "BertForMaskedLM" in message
    with pytest.raises(ConfigError, match="input_layout='geneformer_v2' is a Geneformer layout"):
        from_command_line("train={objective: binned_mlm, input_layout: geneformer_v2}")
    with pytest.raises(ConfigError, match="needs a <cls> token"):
        from_command_line("train={preset: geneformer_10m, pooling: cls}")


def geneformer_inputs(corpus) -> TrainInputs:
    project = corpus["project"]
    return TrainInputs(
        corpus["manifest"],
        corpus["token_mappings"],
        corpus["summaries"],
        {},
        references={
            s: project / "references" / "genes" / f"{s}.parquet" for s in corpus["summaries"]
        },
    )


@pytest.mark.parametrize("layout", ["geneformer_v1", "geneformer_v2"])
def test_geneformer_input_layouts(tiny_corpus, layout):
    """V1: the top max_len genes and no special token; V2: <cls>, the top max_len - 2 genes,
    <eos>. The genes are the rank order's, of protein-coding and miRNA genes only."""
    values = settings(
        objective="geneformer_mlm",
        input_layout=layout,
        gene_types=GENEFORMER_GENE_TYPES,
        pooling="mean",
        **{"model.max_len": 16},
    )
    _, data, model_layout = build(values, geneformer_inputs(tiny_corpus), seed=0)
    data.setup()
    gathered = data.train.collection.gather(np.arange(6))
    out = data.collate(gathered, data.train, CellNoise(0, 0, gathered.cells), train=False)
    tokens, padding = out["tokens"], out["padding_mask"]
    n_genes = 16 if layout == "geneformer_v1" else 14
    offsets, ranked = data.train.collection.rank_batch(gathered, max_len=n_genes)
    assert (np.diff(offsets) == n_genes).all()  # every demo cell has more genes than that
    for row in range(6):
        real = tokens[row][~padding[row]].numpy()
        species = data.train.species[gathered.shard[row]]
        genes = ranked[offsets[row] : offsets[row + 1]]  # the loader gives model token ids
        low, high = model_layout.gene_range(species)
        assert ((genes >= low) & (genes < high)).all()
        if layout == "geneformer_v1":
            assert len(real) == 16 and np.array_equal(real, genes)
        else:
            assert len(real) == 16 and real[0] == model_layout.cls_id
            assert real[-1] == model_layout.eos_id == 3 and np.array_equal(real[1:-1], genes)
            assert (real[1:-1] >= 4).all()
    # Masking never touches the special tokens.
    masked = data.collate(gathered, data.train, CellNoise(0, 0, gathered.cells))
    if layout == "geneformer_v2":
        real_positions = ~masked["padding_mask"]
        last = real_positions.sum(1) - 1
        assert not masked["loss_mask"][torch.arange(6), last].any()
        assert not masked["loss_mask"][:, 0].any()
    # The model's genes are protein-coding and miRNA genes.
    for species, mapping in data.mappings.items():
        reference = pl.read_parquet(
            tiny_corpus["project"] / "references" / "genes" / f"{species}.parquet"
        )
        types = mapping.gene_table.join(reference, on="gene_id")["gene_type"]
        assert set(types) <= set(GENEFORMER_GENE_TYPES)
        everything = pl.read_csv(tiny_corpus["token_mappings"][species])
        assert 0 < mapping.gene_table.height < everything.height - 3


def preset_inputs(corpus, train_settings: dict) -> TrainInputs:
    """The inputs the `train` rule would pass for these settings."""
    project = corpus["project"]
    embeddings = corpus["embeddings"] if train_settings["gene_embeddings"] else {}
    panels = (
        {s: {"hvg": p} for s, p in corpus["panels"].items()}
        if train_settings["objective"] in ("contrastive", "diffusion")
        else {}
    )
    references = {s: project / "references" / "genes" / f"{s}.parquet" for s in corpus["summaries"]}
    return TrainInputs(
        corpus["manifest"],
        corpus["token_mappings"],
        corpus["summaries"],
        embeddings,
        panels,
        references,
    )


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_from_the_command_line_trains_its_family(tiny_corpus, tmp_path, preset):
    """`--config 'train={preset: X}'` alone (plus a short run) trains the objective,
    architecture and input layout X names; Geneformer presets export a BertForMaskedLM."""
    config = from_command_line(
        f"train={{preset: {preset}, max_steps: 2, batch_size: 2, val_batches: 1, "
        "val_every_n_steps: 100, checkpoint_every_n_steps: 100}"
    )
    values = config["train"]
    named = PRESETS[preset]
    export = train(values, preset_inputs(tiny_corpus, values), tmp_path / preset, seed=0)
    exported = json.loads((export / "config.json").read_text())
    assert exported["steps"] == 2 and exported["objective"] == named["objective"]
    encoder = exported["model"]["encoder"]
    for key, value in named.get("model", {}).items():
        assert encoder[key] == value, key
    assert exported["train"]["input_layout"] == named.get("input_layout", "cls")
    specials = exported["vocabulary"]["specials"]
    assert ("<eos>" in specials) == (named.get("input_layout") == "geneformer_v2")
    if preset.startswith("geneformer"):
        assert_loads_as_bert(export)


def assert_loads_as_bert(export: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertForMaskedLM.from_pretrained(export).eval()
    ours, layout, _ = load_pretrained(export)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(layout.n_specials, layout.n_tokens, (3, 40), generator=generator)
    tokens[2, 25:] = layout.pad_id
    padding = tokens == layout.pad_id
    with torch.inference_mode():
        theirs = hf(input_ids=tokens, attention_mask=(~padding).long()).logits
        mine = ours.mlm_head(ours.encode({"tokens": tokens, "padding_mask": padding}))
    difference = (mine[~padding] - theirs[~padding]).abs().max().item()
    print(f"max |logits ours - BertForMaskedLM| = {difference:.2e}")
    assert difference < 1e-5, difference
