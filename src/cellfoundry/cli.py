"""Command line: one subcommand per pipeline stage, each a thin call into its module.

Snakemake rules call these (`python -m cellfoundry <stage> ...`); settings arrive as JSON
strings, exactly the rule's `params`, so a changed setting reruns exactly the rules that read it.
Errors in the input end the command with one line naming the dataset, the file and the problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cellfoundry.errors import CellfoundryError

log = logging.getLogger("cellfoundry")


@dataclass(frozen=True)
class Command:
    """A subcommand: what it runs, its help line, and the function adding its arguments."""

    run: Callable[[argparse.Namespace], None]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS: dict[str, Command] = {}


def command(
    name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], None]], Callable[[argparse.Namespace], None]]:
    """Register a subcommand (in order: `build_parser` lists them so)."""

    def register(
        function: Callable[[argparse.Namespace], None],
    ) -> Callable[[argparse.Namespace], None]:
        COMMANDS[name] = Command(function, help, arguments)
        return function

    return register


def _json(text: str) -> dict:
    return json.loads(text) if text else {}


def _reference_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--species", required=True)
    p.add_argument("--table", default="", help="user table overriding the bundled one")
    p.add_argument("--out", required=True)


@command("reference", help="gene reference of a species", arguments=_reference_arguments)
def _reference(args: argparse.Namespace) -> None:
    from cellfoundry import reference
    from cellfoundry.io import atomic_outputs

    ref = reference.build_reference(args.species, args.table or None)
    with atomic_outputs(args.out) as (out,):
        reference.write_reference(ref, out)
    log.info("%s: %d genes from %s", args.species, len(ref), ref.source)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--n-cells", type=int, default=None, help="cells per dataset (default: each dataset's own)"
    )


@command("demo", help="write the simulated demo corpus", arguments=_demo_arguments)
def _demo(args: argparse.Namespace) -> None:
    from cellfoundry.demo import write_demo_corpus

    paths = write_demo_corpus(Path(args.out), seed=args.seed, n_cells=args.n_cells)
    log.info("wrote %d simulated demo datasets to %s", len(paths), args.out)


def _preprocess_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True)
    p.add_argument("--file", required=True, help="the input's output name (see sources)")
    p.add_argument("--species", required=True)
    p.add_argument("--input", required=True, help="the dataset's file or folder")
    p.add_argument(
        "--reference", default="", help="gene reference parquet ('' when the species has none)"
    )
    p.add_argument(
        "--planning-error",
        default="",
        help="why the dataset's inputs could not be listed while planning (the job fails with it)",
    )
    p.add_argument("--settings", required=True, help="preprocess settings (JSON)")
    p.add_argument("--n-bins", type=int, required=True, help="quantile bins of the shard")
    p.add_argument("--tie-break", default="random", help="shards.tie_break")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exact-max-cells", type=int, required=True, help="gene_stats.exact_max_cells")
    p.add_argument(
        "--block-cells", type=int, default=4096, help="cells read at a time (memory, not results)"
    )
    for name in ("h5ad", "shard", "gene-stats", "qc", "cells"):
        p.add_argument(f"--{name}", required=True)


@command(
    "preprocess", help="preprocess one input file of a dataset", arguments=_preprocess_arguments
)
def _preprocess(args: argparse.Namespace) -> None:
    from cellfoundry.errors import DatasetError
    from cellfoundry.preprocess import FileOutputs, PreprocessSettings, preprocess_file
    from cellfoundry.reference import bundled_species, read_reference
    from cellfoundry.sources import dataset_sources

    if args.input.startswith("lamin://"):  # not resolved while planning: say why
        problem = args.planning_error or "cannot be resolved in the LaminDB source instance"
        raise DatasetError(args.dataset, args.input, problem)
    sources = dataset_sources(args.dataset, args.input).by_name()
    if args.file not in sources:
        raise DatasetError(
            args.dataset, args.input, f"has no input named '{args.file}' any more (plan again)"
        )
    source = sources[args.file]
    if not args.reference:
        raise DatasetError(
            args.dataset,
            source.path,
            f"species '{args.species}' has no gene reference (bundled: {', '.join(bundled_species())}); "
            f"add a table under reference.tables.{args.species} in the config",
        )
    outputs = FileOutputs(
        Path(args.h5ad), Path(args.shard), Path(args.gene_stats), Path(args.qc), Path(args.cells)
    )
    preprocess_file(
        args.dataset,
        args.species,
        source,
        read_reference(args.species, args.reference),
        PreprocessSettings.from_dict(_json(args.settings)),
        outputs,
        n_bins=args.n_bins,
        seed=args.seed,
        tie_break=args.tie_break,
        block_cells=args.block_cells,
        exact_max_cells=args.exact_max_cells,
    )


def _aggregate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True)
    p.add_argument("--species", required=True)
    p.add_argument("--input", required=True, help="the dataset's file or folder")
    p.add_argument("--settings", required=True, help="preprocess settings (JSON)")
    p.add_argument("--exact-max-cells", type=int, required=True)
    p.add_argument("--reference-source", default="")
    p.add_argument("--h5ad-dir", default="", help="data/<dataset>/h5ads (obsolete files go)")
    p.add_argument("--file-qc", nargs="+", required=True)
    p.add_argument("--file-stats", nargs="+", required=True)
    p.add_argument("--shards", nargs="+", required=True)
    for name in ("gene-stats", "qc", "qc-plot", "provenance", "shard-manifest"):
        p.add_argument(f"--{name}", required=True)


@command(
    "aggregate", help="merge the per-file outputs of one dataset", arguments=_aggregate_arguments
)
def _aggregate(args: argparse.Namespace) -> None:
    from cellfoundry.preprocess import DatasetOutputs, PreprocessSettings, aggregate_dataset

    settings = _json(args.settings)
    aggregate_dataset(
        args.dataset,
        args.species,
        args.input,
        [Path(p) for p in args.file_qc],
        [Path(p) for p in args.file_stats],
        [Path(p) for p in args.shards],
        PreprocessSettings.from_dict(settings),
        DatasetOutputs(
            Path(args.gene_stats),
            Path(args.qc),
            Path(args.qc_plot),
            Path(args.provenance),
            Path(args.shard_manifest),
        ),
        reference_source=args.reference_source,
        config_slice={"input": args.input, "preprocess": settings},
        exact_max_cells=args.exact_max_cells,
        h5ad_dir=Path(args.h5ad_dir) if args.h5ad_dir else None,
    )


def _gene_stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--species", required=True)
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--exact-max-cells", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--summary", required=True)
    p.add_argument(
        "--medians",
        default="",
        help="Geneformer gene_median_dictionary_gc*.pkl whose medians replace the corpus ones",
    )


@command(
    "gene-stats",
    help="merge per-dataset gene statistics of a species",
    arguments=_gene_stats_arguments,
)
def _gene_stats(args: argparse.Namespace) -> None:
    from cellfoundry.gene_stats import (
        merge_gene_stats,
        summarize,
        with_imported_medians,
        write_gene_stats,
    )
    from cellfoundry.io import atomic_outputs
    from cellfoundry.vocabulary import read_gene_median_dictionary

    merged = merge_gene_stats(sorted(args.inputs), exact_max_cells=args.exact_max_cells)
    summary = summarize(merged)
    if args.medians:
        imported = with_imported_medians(summary, read_gene_median_dictionary(args.medians))
        summary = imported.summary
        log.info(
            "%s: non-zero medians of %d genes taken from %s; %d corpus genes have none there "
            "and are left out of rank order; %d of its genes are not in the corpus",
            args.species,
            imported.n_imported,
            args.medians,
            imported.n_without,
            imported.n_unused,
        )
    with atomic_outputs(args.out, args.summary) as (out, summary_out):
        write_gene_stats(merged, out)
        summary.write_parquet(summary_out, statistics=False)
    log.info(
        "%s: merged statistics of %d datasets, %d genes (%d medians exact)",
        args.species,
        len(args.inputs),
        merged.height,
        int(summary["median_exact"].sum()),
    )


def _vocabulary_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--species", required=True)
    p.add_argument("--stats", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--min-cells", type=int, default=1)
    p.add_argument(
        "--import",
        dest="import_path",
        default="",
        help="token mapping CSV or Geneformer vocab to import",
    )
    p.add_argument("--out", required=True)


@command("vocabulary", help="token mapping of a species", arguments=_vocabulary_arguments)
def _vocabulary(args: argparse.Namespace) -> None:
    import polars as pl

    from cellfoundry import vocabulary
    from cellfoundry.io import atomic_outputs
    from cellfoundry.reference import read_reference

    reference = read_reference(args.species, args.reference)
    if args.import_path:
        mapping = vocabulary.import_token_mapping(args.species, args.import_path, reference)
    else:
        stats = pl.read_parquet(args.stats)
        mapping = vocabulary.build_vocabulary(
            args.species, stats, reference, min_cells=args.min_cells
        )
    with atomic_outputs(args.out) as (out,):
        vocabulary.write_token_mapping(mapping, out)
    log.info("%s: %d tokens (%d genes)", args.species, mapping.n_tokens, mapping.gene_table.height)


def _panel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--species", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--token-mapping", required=True)
    p.add_argument("--summary", default="", help="species gene summary (hvg panel)")
    p.add_argument("--settings", default="", help="hvg settings (JSON)")
    p.add_argument("--source", default="", help="user panel CSV")
    p.add_argument("--reference", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--report", required=True)


@command("panel", help="one gene panel of a species", arguments=_panel_arguments)
def _panel(args: argparse.Namespace) -> None:
    import polars as pl

    from cellfoundry import panels
    from cellfoundry.io import atomic_outputs, write_json
    from cellfoundry.reference import read_reference
    from cellfoundry.vocabulary import read_token_mapping

    mapping = read_token_mapping(args.species, args.token_mapping)
    if args.name == "hvg":
        settings = _json(args.settings)
        summary = pl.read_parquet(args.summary)
        panel = panels.hvg_panel(
            args.species,
            summary,
            mapping,
            n_top_genes=settings["n_top_genes"],
            n_bins=settings["n_bins"],
        )
    else:
        reference = read_reference(args.species, args.reference)
        panel = panels.user_panel(args.name, args.species, args.source, reference, mapping)
    if panel.unknown:
        log.warning(
            "%s panel '%s': %d entries are not genes of the vocabulary and were left out: %s",
            args.species,
            args.name,
            len(panel.unknown),
            ", ".join(panel.unknown[:20]),
        )
    with atomic_outputs(args.out, args.report) as (out, report):
        panels.write_panel(panel, out)
        write_json(report, panel.report())
    log.info("%s panel '%s': %d genes", args.species, args.name, panel.table.height)


def _splits_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", required=True, help="config splits section (JSON)")
    p.add_argument("--qc", nargs="+", required=True, help="qc/<dataset>/qc.json of every dataset")
    p.add_argument("--manifests", nargs="+", required=True, help="shards/<dataset>/manifest.json")
    p.add_argument("--project-path", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--holdout", required=True, help="cells held out by the default split")
    p.add_argument("--split-dir", required=True, help="where default split files are written")


@command("splits", help="expand split files into the split manifest", arguments=_splits_arguments)
def _splits(args: argparse.Namespace) -> None:
    import polars as pl

    from cellfoundry import splits
    from cellfoundry.io import atomic_outputs, read_json

    settings = _json(args.settings)
    project_path = args.project_path
    records = [read_json(p) for p in sorted(args.qc)]
    datasets = {r["dataset"]: r["species"] for r in records}
    loaders = {"train": settings.get("train", []), "val": settings.get("val", [])}
    defaults = {}
    holdout = pl.DataFrame(schema=splits.HOLDOUT_SCHEMA)
    if not loaders["train"] and not loaders["val"]:
        files = {r["dataset"]: (r["species"], [f["output"] for f in r["files"]]) for r in records}
        defaults = splits.default_splits(files, project_path=project_path)
        loaders = {"train": sorted(defaults), "val": []}
        available = defaults
        holdout = splits.default_holdout(
            records,
            [Path(p) for p in args.manifests],
            seed=args.seed,
            val_fraction=settings["val_fraction"],
            max_cells_per_file=settings["val_max_cells_per_file"],
        )
    else:
        names = {
            item if isinstance(item, str) else item["source"]
            for items in loaders.values()
            for item in items
        }
        available = {
            name: splits.load_split_file(Path(settings["dir"]) / f"{name}.yaml", project_path)
            for name in sorted(names)
        }
    manifest = splits.expand(loaders, available, datasets=datasets)
    outputs = [args.out, args.holdout] + [
        Path(args.split_dir) / f"{name}.yaml" for name in sorted(defaults)
    ]
    with atomic_outputs(*outputs) as (out, holdout_out, *split_files):
        manifest.write_parquet(out, statistics=False)
        holdout.write_parquet(holdout_out, statistics=False)
        for path, name in zip(split_files, sorted(defaults), strict=True):
            path.write_text(splits.split_yaml(defaults[name]))
    counts = manifest.group_by("split").len().sort("split").rows()
    log.info("split manifest: %s", ", ".join(f"{split}: {n} files" for split, n in counts))
    if defaults:
        held = splits.holdout_by_species(holdout, datasets)
        log.info(
            "default split: cells held out for validation (val_fraction %s, at most %s per "
            "file): %s",
            settings["val_fraction"],
            settings["val_max_cells_per_file"],
            ", ".join(f"{species}: {n}" for species, n in held.items()) or "none",
        )


def _shard_manifest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--splits", required=True)
    p.add_argument("--holdout", required=True, help="manifests/holdout.parquet")
    p.add_argument("--manifests", nargs="+", required=True, help="shards/<dataset>/manifest.json")
    p.add_argument("--out", required=True)


@command(
    "shard-manifest",
    help="one manifest of all shards with their splits",
    arguments=_shard_manifest_arguments,
)
def _shard_manifest(args: argparse.Namespace) -> None:
    import polars as pl

    from cellfoundry.io import atomic_outputs
    from cellfoundry.shards import shard_manifest

    manifest = shard_manifest(
        pl.read_parquet(args.splits),
        [Path(p) for p in args.manifests],
        holdout=pl.read_parquet(args.holdout),
    )
    with atomic_outputs(args.out) as (out,):
        manifest.write_parquet(out, statistics=False)
    log.info("shard manifest: %d files, %d cells", manifest.height, manifest["n_cells"].sum())


def _embeddings_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--name", required=True, help="name of the embedding (folder under references/embeddings)"
    )
    p.add_argument("--species", required=True)
    p.add_argument("--token-mapping", required=True)
    p.add_argument(
        "--shard-manifests",
        nargs="+",
        required=True,
        help="the species' shards/<dataset>/manifest.json",
    )
    p.add_argument("--settings", required=True, help="method settings including 'method' (JSON)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--report", required=True)


@command(
    "embeddings", help="gene embeddings of a species by one method", arguments=_embeddings_arguments
)
def _embeddings(args: argparse.Namespace) -> None:
    from cellfoundry import embeddings
    from cellfoundry.io import atomic_outputs, write_json
    from cellfoundry.shards import shard_folders
    from cellfoundry.vocabulary import read_token_mapping

    settings = _json(args.settings)
    inputs = embeddings.EmbeddingInputs(
        species=args.species,
        token_mapping=read_token_mapping(args.species, args.token_mapping),
        shards=tuple(
            folder
            for manifest in sorted(args.shard_manifests)
            for folder in shard_folders(Path(manifest).parent)
        ),
        seed=args.seed,
    )
    method = embeddings.resolve_method(settings.pop("method"))
    result = method(inputs, settings)
    with atomic_outputs(args.out, args.report) as (out, report):
        embeddings.write_csv(result, out)
        write_json(report, {"name": args.name, "species": args.species, **result.report()})
    summary = result.report()
    log.info(
        "%s %s: %d of %d genes embedded in %d dimensions; %d get the zero fallback",
        args.name,
        args.species,
        summary["n_embedded"],
        summary["n_genes"],
        summary["dim"],
        summary["n_fallback"],
    )


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settings", default="", help="the config's train section (JSON)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set model.d_model=256",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--manifest", required=True, help="manifests/shards.parquet")
    p.add_argument(
        "--token-mappings", nargs="+", required=True, help="<species>.csv token mappings"
    )
    p.add_argument(
        "--summaries",
        nargs="*",
        default=[],
        help="<species>.summary.parquet gene summaries (medians)",
    )
    p.add_argument("--gene-embeddings", nargs="*", default=[], help="<species>.csv gene embeddings")
    p.add_argument(
        "--panels",
        nargs="*",
        default=[],
        help="panels/<species>/<name>.csv (contrastive, diffusion)",
    )
    p.add_argument(
        "--references",
        nargs="*",
        default=[],
        help="references/genes/<species>.parquet (gene types; symbols for embed-cells)",
    )
    p.add_argument("--run-dir", required=True, help="model_checkpoints/<run>")
    p.add_argument(
        "--devices", type=int, default=1, help="devices per node (from the rule's resources)"
    )
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--accelerator", default="auto")
    p.add_argument(
        "--eval", default="", help="the config's eval section (JSON); none: no evaluation"
    )


@command(
    "train",
    help="train (or resume) a model and export it to <run-dir>/final",
    arguments=_train_arguments,
)
def _train(args: argparse.Namespace) -> None:
    from cellfoundry.config import section_defaults
    from cellfoundry.train.run import TrainInputs, train

    settings = section_defaults(
        "train", apply_overrides(_json(args.settings), args.set), source="--settings/--set"
    )
    inputs = TrainInputs(
        manifest=Path(args.manifest),
        token_mappings=_by_species(args.token_mappings),
        summaries=_by_species(args.summaries),
        gene_embeddings=_by_species(args.gene_embeddings),
        panels=_panels_by_species(args.panels),
        references=_by_species(args.references),
    )
    evaluation = section_defaults("eval", _json(args.eval), source="--eval") if args.eval else None
    train(
        settings,
        inputs,
        args.run_dir,
        seed=args.seed,
        devices=args.devices,
        num_nodes=args.num_nodes,
        accelerator=args.accelerator,
        evaluation=evaluation,
    )


def _by_species(paths: Sequence[str]) -> dict[str, Path]:
    """Files named after their species (`hsapiens.csv`, `hsapiens.summary.parquet`)."""
    return {Path(p).name.split(".")[0]: Path(p) for p in paths}


def _panels_by_species(paths: Sequence[str]) -> dict[str, dict[str, Path]]:
    """Panel files `panels/<species>/<name>.csv`, by species and name."""
    panels: dict[str, dict[str, Path]] = {}
    for path in map(Path, paths):
        panels.setdefault(path.parent.name, {})[path.stem] = path
    return panels


def _embed_cells_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="exported model folder (model_checkpoints/<run>/final)"
    )
    p.add_argument(
        "--h5ad",
        required=True,
        help="an h5ad of raw counts in X; genes as Ensembl IDs or symbols (mapped like preprocess)",
    )
    p.add_argument("--out", default="", help="where to write (default: in place)")
    p.add_argument(
        "--species", default="", help="default: the file's uns['cellfoundry']['species']"
    )
    p.add_argument("--key", default="X_cellfoundry", help="obsm key")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")


@command(
    "embed-cells",
    help="write a trained model's cell embeddings into an h5ad (obsm)",
    arguments=_embed_cells_arguments,
)
def _embed_cells(args: argparse.Namespace) -> None:
    from cellfoundry.inference import embed_h5ad

    embed_h5ad(
        args.model,
        args.h5ad,
        args.out or args.h5ad,
        species=args.species or None,
        key=args.key,
        batch_size=args.batch_size,
        device=args.device,
    )


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--species", required=True)
    p.add_argument("--n-cells", type=int, default=100)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)


@command("sample", help="generate cells with a diffusion model", arguments=_sample_arguments)
def _sample(args: argparse.Namespace) -> None:
    from cellfoundry.inference import sample_cells

    generated = sample_cells(
        args.model, args.species, args.n_cells, steps=args.steps, seed=args.seed, device=args.device
    )
    generated.write_h5ad(args.out)
    log.info(
        "generated %d %s cells over %d genes -> %s",
        generated.n_obs,
        args.species,
        generated.n_vars,
        args.out,
    )


def _report_corpus_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--qc", nargs="+", required=True)
    p.add_argument("--token-mappings", nargs="+", required=True)
    p.add_argument("--panel-reports", nargs="*", default=[])
    p.add_argument("--embedding-reports", nargs="*", default=[])
    p.add_argument("--datasets-out", required=True)
    p.add_argument("--species-out", required=True)
    p.add_argument("--html", required=True, help="both tables as an HTML page (for the report)")


@command(
    "report-corpus",
    help="dataset and species tables for the report",
    arguments=_report_corpus_arguments,
)
def _report_corpus(args: argparse.Namespace) -> None:
    from cellfoundry.io import atomic_outputs
    from cellfoundry.report import corpus_tables, html_tables

    datasets, species = corpus_tables(
        [Path(p) for p in args.qc],
        [Path(p) for p in args.token_mappings],
        [Path(p) for p in args.panel_reports],
        [Path(p) for p in args.embedding_reports],
    )
    with atomic_outputs(args.datasets_out, args.species_out, args.html) as (
        datasets_out,
        species_out,
        page,
    ):
        datasets.write_csv(datasets_out, separator="\t")
        species.write_csv(species_out, separator="\t")
        page.write_text(html_tables("Corpus", {"Datasets": datasets, "Species": species}))


def _report_training_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", required=True, help="model_checkpoints/<run>/logs/metrics.csv")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--summary", required=True)


@command(
    "report-training", help="training and validation curves", arguments=_report_training_arguments
)
def _report_training(args: argparse.Namespace) -> None:
    from cellfoundry.io import atomic_outputs, write_json
    from cellfoundry.report import training_figure

    with atomic_outputs(args.out, args.summary) as (out, summary):
        write_json(summary, training_figure(args.metrics, out, title=args.title))


def _report_embeddings_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--manifest", required=True, help="manifests/shards.parquet")
    p.add_argument("--settings", default="", help="the config's eval section (JSON)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True, help="one <dataset>.png per dataset")
    p.add_argument("--table", required=True)
    p.add_argument(
        "--html", required=True, help="the metrics table as an HTML page (for the report)"
    )


@command(
    "report-embeddings",
    help="UMAPs of cell embeddings by label, metrics vs a PCA baseline",
    arguments=_report_embeddings_arguments,
)
def _report_embeddings(args: argparse.Namespace) -> None:
    from cellfoundry.config import section_defaults
    from cellfoundry.io import atomic_outputs
    from cellfoundry.metrics import KNN_REPEATS
    from cellfoundry.report import embedding_report, html_tables

    settings = section_defaults("eval", _json(args.settings), source="--settings")
    with atomic_outputs(args.out_dir, args.table, args.html) as (out_dir, table, page):
        metrics = embedding_report(settings, args.manifest, args.model, out_dir, seed=args.seed)
        metrics.write_csv(table, separator="\t")
        note = (
            f"A seeded subsample of at most {settings['n_cells']} cells per dataset. "
            f"kNN label accuracy: k={settings['k']}, the mean of {KNN_REPEATS} repeats of 5-fold "
            "cross-validation; silhouettes, "
            "graph connectivity and iLISI as in scIB, scaled to [0, 1] (higher is better); "
            "_pca: the same metric on a PCA of highly variable genes of log-normalised counts."
        )
        page.write_text(html_tables("Cell embeddings", {"Metrics": metrics}, note=note))


def _report_evaluation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", required=True, help="model_checkpoints/<run>/logs/metrics.csv")
    p.add_argument("--out-dir", required=True, help="one <dataset>.png per dataset")


@command(
    "report-evaluation",
    help="metrics of the evaluation during training, over steps",
    arguments=_report_evaluation_arguments,
)
def _report_evaluation(args: argparse.Namespace) -> None:
    from cellfoundry.io import atomic_outputs
    from cellfoundry.report import evaluation_figures

    with atomic_outputs(args.out_dir) as (out_dir,):
        figures = evaluation_figures(args.metrics, out_dir)
    log.info("%d evaluation figure(s) in %s", len(figures), args.out_dir)


def _lamin_register_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--project", required=True, help="project directory (the instance's storage root)"
    )
    p.add_argument("--name", required=True, help="instance name (anonymous/<name>)")
    p.add_argument("--transform-key", required=True)
    p.add_argument("--transform-version", required=True)
    p.add_argument("--params", default="", help="the rule's params (JSON)")
    p.add_argument(
        "--outputs", nargs="+", required=True, help="files or folders (h5ads/ folders: their files)"
    )
    p.add_argument("--inputs", nargs="*", default=[])
    p.add_argument("--description", default="")
    p.add_argument("--receipt", required=True, help="JSON record of the registration")


@command(
    "lamin-register",
    help="register outputs in the project's LaminDB instance",
    arguments=_lamin_register_arguments,
)
def _lamin_register(args: argparse.Namespace) -> None:
    from cellfoundry.io import atomic_outputs, write_json
    from cellfoundry.lamin import init_instance, instance_lock, register_outputs

    # The project is the instance's storage root: its files are registered in place.
    with instance_lock(args.project):
        init_instance(args.project, name=args.name, settings_dir=args.project)
        registration = register_outputs(
            _expand_h5ad_dirs(args.outputs),
            transform_key=args.transform_key,
            transform_version=args.transform_version,
            params=_json(args.params),
            inputs=_expand_h5ad_dirs(args.inputs),
            description=args.description or None,
        )
    with atomic_outputs(args.receipt) as (receipt,):
        write_json(receipt, registration.to_dict())
    log.info(
        "registered %d artifact(s) of %s (run %s, %d input(s)%s)",
        len(registration.outputs),
        args.transform_key,
        registration.run,
        len(registration.inputs),
        ", unchanged" if registration.reused else "",
    )


def _lamin_lineage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--artifact", required=True, help="path of a registered output")


@command(
    "lamin-lineage",
    help="what an artifact was made from (e.g. a model's training data)",
    arguments=_lamin_lineage_arguments,
)
def _lamin_lineage(args: argparse.Namespace) -> None:
    from cellfoundry.lamin import connect, lineage_of, storage_root

    ln = connect(f"anonymous/{args.name}", settings_dir=args.project)
    key = Path(args.artifact).resolve().relative_to(storage_root()).as_posix()
    artifact = ln.Artifact.filter(key=key).order_by("-created_at").first()
    if artifact is None:
        raise CellfoundryError(f"no artifact with key '{key}' in instance {args.name}")
    for parent in lineage_of(artifact):
        print(f"{parent.key}\t{parent.uid}\t{parent.run.transform.key if parent.run else 'input'}")


def _expand_h5ad_dirs(paths: Sequence[str]) -> list[Path]:
    """Paths, with each folder of preprocessed files (`*/h5ads`) replaced by its h5ad files."""
    out: list[Path] = []
    for path in map(Path, paths):
        out += sorted(path.glob("*.h5ad")) if path.is_dir() and path.name == "h5ads" else [path]
    return out


def apply_overrides(settings: dict, overrides: Sequence[str]) -> dict:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a nested settings dict."""
    import yaml

    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise CellfoundryError(f"--set {override!r}: expected key=value")
        node = settings
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(text)
    return settings


def build_parser() -> argparse.ArgumentParser:
    """The `cellfoundry` parser: one subcommand per registered command (`command`)."""
    parser = argparse.ArgumentParser(prog="cellfoundry", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, registered in COMMANDS.items():
        registered.arguments(sub.add_parser(name, help=registered.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.captureWarnings(True)
    try:
        COMMANDS[args.command].run(args)
    except CellfoundryError as error:
        print(f"cellfoundry {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0
