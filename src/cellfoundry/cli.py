"""Command line: one subcommand per pipeline stage, each a thin call into its module.

Snakemake rules call these (`python -m cellfoundry <stage> ...`); settings arrive as JSON
strings, exactly the rule's `params`, so a changed setting reruns exactly the rules that read it.
Errors in the input end the command with one line naming the dataset, the file and the problem.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cellfoundry.errors import CellfoundryError

log = logging.getLogger("cellfoundry")
COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {}


def command(
    name: str,
) -> Callable[[Callable[[argparse.Namespace], None]], Callable[[argparse.Namespace], None]]:
    def register(
        function: Callable[[argparse.Namespace], None],
    ) -> Callable[[argparse.Namespace], None]:
        COMMANDS[name] = function
        return function

    return register


def _json(text: str) -> dict:
    return json.loads(text) if text else {}


@command("reference")
def _reference(args: argparse.Namespace) -> None:
    from cellfoundry import reference
    from cellfoundry.io import atomic_outputs

    ref = reference.build_reference(args.species, args.table or None)
    with atomic_outputs(args.out) as (out,):
        reference.write_reference(ref, out)
    log.info("%s: %d genes from %s", args.species, len(ref), ref.source)


@command("demo")
def _demo(args: argparse.Namespace) -> None:
    from cellfoundry.demo import write_demo_corpus

    paths = write_demo_corpus(Path(args.out), seed=args.seed, n_cells=args.n_cells)
    log.info("wrote %d simulated demo datasets to %s", len(paths), args.out)


@command("preprocess")
def _preprocess(args: argparse.Namespace) -> None:
    from cellfoundry.preprocess import DatasetOutputs, PreprocessSettings, preprocess_dataset
    from cellfoundry.reference import read_reference

    settings = _json(args.settings)
    reference = read_reference(args.species, args.reference) if args.reference else None
    outputs = DatasetOutputs(
        Path(args.h5ad_dir),
        Path(args.gene_stats),
        Path(args.qc_json),
        Path(args.qc_plot),
        Path(args.provenance),
    )
    with _dataset_source(args) as source:
        preprocess_dataset(
            args.dataset,
            args.species,
            source,
            reference,
            PreprocessSettings.from_dict(settings),
            outputs,
            config_slice={"input": args.input, "preprocess": settings},
        )


@contextlib.contextmanager
def _dataset_source(args: argparse.Namespace) -> Iterator[Path]:
    """The dataset's file or folder; a LaminDB reference becomes a temporary folder of links
    to the artifacts' files, named as the pipeline expects."""
    if not args.input.startswith("lamin://"):
        yield Path(args.input)
        return
    from cellfoundry.lamin import connect, resolve_source

    connect(args.lamin_instance or None, settings_dir=args.lamin_settings_dir or None)
    files = resolve_source(args.input)
    with tempfile.TemporaryDirectory(prefix=f"cellfoundry-{args.dataset}-") as folder:
        for file in files:
            (Path(folder) / file.name).symlink_to(file.resolve())
        yield Path(folder)


@command("gene-stats")
def _gene_stats(args: argparse.Namespace) -> None:
    import polars as pl

    from cellfoundry.gene_stats import merge_gene_stats, summarize
    from cellfoundry.io import atomic_outputs

    merged = merge_gene_stats([pl.read_parquet(p) for p in args.inputs])
    summary = summarize(merged)
    with atomic_outputs(args.out, args.summary) as (out, summary_out):
        merged.write_parquet(out, statistics=False)
        summary.write_parquet(summary_out, statistics=False)
    log.info(
        "%s: merged statistics of %d datasets, %d genes",
        args.species,
        len(args.inputs),
        merged.height,
    )


@command("vocabulary")
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


@command("panel")
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


@command("splits")
def _splits(args: argparse.Namespace) -> None:
    from cellfoundry import splits
    from cellfoundry.io import atomic_outputs

    settings = _json(args.settings)
    datasets = _json(args.datasets)  # name -> species
    project_path = args.project_path
    loaders = {"train": settings.get("train", []), "val": settings.get("val", [])}
    defaults = {}
    if not loaders["train"] and not loaders["val"]:
        files = {
            name: (
                species,
                sorted(
                    p.name for p in (Path(project_path) / "data" / name / "h5ads").glob("*.h5ad")
                ),
            )
            for name, species in datasets.items()
        }
        defaults = splits.default_splits(
            files, project_path=project_path, seed=args.seed, val_fraction=settings["val_fraction"]
        )
        loaders = {"train": sorted(defaults), "val": sorted(defaults)}
        available = defaults
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
    outputs = [args.out] + [Path(args.split_dir) / f"{name}.yaml" for name in sorted(defaults)]
    with atomic_outputs(*outputs) as (out, *split_files):
        manifest.write_parquet(out, statistics=False)
        for path, name in zip(split_files, sorted(defaults), strict=True):
            path.write_text(splits.split_yaml(defaults[name]))
    counts = manifest.group_by("split").len().sort("split").rows()
    log.info("split manifest: %s", ", ".join(f"{split}: {n} files" for split, n in counts))


@command("shards")
def _shards(args: argparse.Namespace) -> None:
    from cellfoundry.shards import write_dataset_shards

    write_dataset_shards(args.dataset, args.species, args.h5ad_dir, args.out, n_bins=args.n_bins)


@command("shard-manifest")
def _shard_manifest(args: argparse.Namespace) -> None:
    import polars as pl

    from cellfoundry.io import atomic_outputs
    from cellfoundry.shards import shard_manifest

    roots = {Path(p).name: Path(p) for p in args.shards}
    manifest = shard_manifest(pl.read_parquet(args.splits), roots)
    with atomic_outputs(args.out) as (out,):
        manifest.write_parquet(out, statistics=False)
    log.info("shard manifest: %d files, %d cells", manifest.height, manifest["n_cells"].sum())


@command("embeddings")
def _embeddings(args: argparse.Namespace) -> None:
    from cellfoundry import embeddings
    from cellfoundry.io import atomic_outputs, write_json
    from cellfoundry.shards import shard_folders
    from cellfoundry.vocabulary import read_token_mapping

    settings = _json(args.settings)
    inputs = embeddings.EmbeddingInputs(
        species=args.species,
        token_mapping=read_token_mapping(args.species, args.token_mapping),
        shards=tuple(folder for root in sorted(args.shards) for folder in shard_folders(root)),
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


@command("train")
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


@command("embed-cells")
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


@command("sample")
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


@command("report-corpus")
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


@command("report-training")
def _report_training(args: argparse.Namespace) -> None:
    from cellfoundry.io import atomic_outputs, write_json
    from cellfoundry.report import training_figure

    with atomic_outputs(args.out, args.summary) as (out, summary):
        write_json(summary, training_figure(args.metrics, out, title=args.title))


@command("report-embeddings")
def _report_embeddings(args: argparse.Namespace) -> None:
    from cellfoundry.config import section_defaults
    from cellfoundry.io import atomic_outputs
    from cellfoundry.report import embedding_report, html_tables

    settings = section_defaults("eval", _json(args.settings), source="--settings")
    with atomic_outputs(args.out_dir, args.table, args.html) as (out_dir, table, page):
        metrics = embedding_report(settings, args.manifest, args.model, out_dir, seed=args.seed)
        metrics.write_csv(table, separator="\t")
        note = (
            f"A seeded subsample of at most {settings['n_cells']} cells per dataset. "
            f"kNN label accuracy: k={settings['k']}, 5-fold cross-validation; silhouettes, "
            "graph connectivity and iLISI as in scIB, scaled to [0, 1] (higher is better); "
            "_pca: the same metric on a PCA of highly variable genes of log-normalised counts."
        )
        page.write_text(html_tables("Cell embeddings", {"Metrics": metrics}, note=note))


@command("report-evaluation")
def _report_evaluation(args: argparse.Namespace) -> None:
    from cellfoundry.io import atomic_outputs
    from cellfoundry.report import evaluation_figures

    with atomic_outputs(args.out_dir) as (out_dir,):
        figures = evaluation_figures(args.metrics, out_dir)
    log.info("%d evaluation figure(s) in %s", len(figures), args.out_dir)


@command("lamin-register")
def _lamin_register(args: argparse.Namespace) -> None:
    from cellfoundry.io import atomic_outputs, write_json
    from cellfoundry.lamin import init_instance, register_outputs

    # The project is the instance's storage root: its files are registered in place.
    init_instance(args.project, name=args.name, settings_dir=args.project)
    outputs = _expand_h5ad_dirs(args.outputs)
    registration = register_outputs(
        outputs,
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


@command("lamin-lineage")
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
    parser = argparse.ArgumentParser(prog="cellfoundry", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reference", help="gene reference of a species")
    p.add_argument("--species", required=True)
    p.add_argument("--table", default="", help="user table overriding the bundled one")
    p.add_argument("--out", required=True)

    p = sub.add_parser("demo", help="write the simulated demo corpus")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--n-cells", type=int, default=None, help="cells per dataset (default: each dataset's own)"
    )

    p = sub.add_parser("preprocess", help="preprocess one dataset")
    p.add_argument("--dataset", required=True)
    p.add_argument("--species", required=True)
    p.add_argument("--input", required=True, help="file, folder or lamin:// reference")
    p.add_argument(
        "--reference", default="", help="gene reference parquet ('' when the species has none)"
    )
    p.add_argument("--settings", required=True, help="preprocess settings (JSON)")
    for name in ("h5ad-dir", "gene-stats", "qc-json", "qc-plot", "provenance"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument(
        "--lamin-instance", default="", help="instance of a lamin:// input (default: lamindb's own)"
    )
    p.add_argument(
        "--lamin-settings-dir",
        default="",
        help="folder whose .lamin/ holds that instance's settings",
    )

    p = sub.add_parser("gene-stats", help="merge per-dataset gene statistics of a species")
    p.add_argument("--species", required=True)
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--summary", required=True)

    p = sub.add_parser("vocabulary", help="token mapping of a species")
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

    p = sub.add_parser("panel", help="one gene panel of a species")
    p.add_argument("--species", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--token-mapping", required=True)
    p.add_argument("--summary", default="", help="species gene summary (hvg panel)")
    p.add_argument("--settings", default="", help="hvg settings (JSON)")
    p.add_argument("--source", default="", help="user panel CSV")
    p.add_argument("--reference", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--report", required=True)

    p = sub.add_parser("splits", help="expand split files into the split manifest")
    p.add_argument("--settings", required=True, help="config splits section (JSON)")
    p.add_argument("--datasets", required=True, help="dataset -> species (JSON)")
    p.add_argument("--project-path", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--split-dir", required=True, help="where default split files are written")

    p = sub.add_parser("shards", help="training shards of one dataset")
    p.add_argument("--dataset", required=True)
    p.add_argument("--species", required=True)
    p.add_argument("--h5ad-dir", required=True)
    p.add_argument("--n-bins", type=int, required=True)
    p.add_argument("--out", required=True)

    p = sub.add_parser("embeddings", help="gene embeddings of a species by one method")
    p.add_argument(
        "--name", required=True, help="name of the embedding (folder under references/embeddings)"
    )
    p.add_argument("--species", required=True)
    p.add_argument("--token-mapping", required=True)
    p.add_argument(
        "--shards", nargs="+", required=True, help="the species' shards/<dataset> folders"
    )
    p.add_argument("--settings", required=True, help="method settings including 'method' (JSON)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--report", required=True)

    p = sub.add_parser("train", help="train (or resume) a model and export it to <run-dir>/final")
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
    p.add_argument("--run-dir", required=True, help="model_checkpoints/<run>")
    p.add_argument(
        "--eval", default="", help="the config's eval section (JSON); none: no evaluation"
    )
    p.add_argument(
        "--devices", type=int, default=1, help="devices per node (from the rule's resources)"
    )
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--accelerator", default="auto")

    p = sub.add_parser(
        "embed-cells", help="write a trained model's cell embeddings into an h5ad (obsm)"
    )
    p.add_argument(
        "--model", required=True, help="exported model folder (model_checkpoints/<run>/final)"
    )
    p.add_argument("--h5ad", required=True, help="a preprocessed h5ad (raw counts, Ensembl IDs)")
    p.add_argument("--out", default="", help="where to write (default: in place)")
    p.add_argument(
        "--species", default="", help="default: the file's uns['cellfoundry']['species']"
    )
    p.add_argument("--key", default="X_cellfoundry", help="obsm key")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("sample", help="generate cells with a diffusion model")
    p.add_argument("--model", required=True)
    p.add_argument("--species", required=True)
    p.add_argument("--n-cells", type=int, default=100)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True)

    p = sub.add_parser("report-corpus", help="dataset and species tables for the report")
    p.add_argument("--qc", nargs="+", required=True)
    p.add_argument("--token-mappings", nargs="+", required=True)
    p.add_argument("--panel-reports", nargs="*", default=[])
    p.add_argument("--embedding-reports", nargs="*", default=[])
    p.add_argument("--datasets-out", required=True)
    p.add_argument("--species-out", required=True)
    p.add_argument("--html", required=True, help="both tables as an HTML page (for the report)")

    p = sub.add_parser("report-training", help="training and validation curves")
    p.add_argument("--metrics", required=True, help="model_checkpoints/<run>/logs/metrics.csv")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--summary", required=True)

    p = sub.add_parser(
        "report-embeddings", help="UMAPs of cell embeddings by label, metrics vs PCA"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--manifest", required=True, help="manifests/shards.parquet")
    p.add_argument("--settings", default="", help="the config's eval section (JSON)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True, help="one <dataset>.png per dataset")
    p.add_argument("--table", required=True)
    p.add_argument(
        "--html", required=True, help="the metrics table as an HTML page (for the report)"
    )

    p = sub.add_parser(
        "report-evaluation", help="metrics of the evaluation during training, over steps"
    )
    p.add_argument("--metrics", required=True, help="model_checkpoints/<run>/logs/metrics.csv")
    p.add_argument("--out-dir", required=True, help="one <dataset>.png per dataset")

    p = sub.add_parser("lamin-register", help="register outputs in the project's LaminDB instance")
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

    p = sub.add_parser(
        "lamin-lineage", help="what an artifact was made from (e.g. a model's training data)"
    )
    p.add_argument("--project", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--artifact", required=True, help="path of a registered output")

    p = sub.add_parser("shard-manifest", help="one manifest of all shards with their splits")
    p.add_argument("--splits", required=True)
    p.add_argument("--shards", nargs="+", required=True)
    p.add_argument("--out", required=True)
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
        COMMANDS[args.command](args)
    except CellfoundryError as error:
        print(f"cellfoundry {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0
