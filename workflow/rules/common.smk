# Helpers of the workflow: config and dataset-sheet validation, wildcard constraints, input
# and params functions. Rules stay thin calls into the cellfoundry package.
import functools
import inspect
import json
import os
import re
from pathlib import Path

from cellfoundry import formats
from cellfoundry.config import dataset_settings, read_dataset_sheet, validate_config
from cellfoundry.demo import demo_files
from cellfoundry.errors import CellfoundryError
from cellfoundry.reference import bundled_species
from cellfoundry.sources import SourceFile, dataset_sources, output_name
from cellfoundry import embeddings, panels, splits, vocabulary
from snakemake.common import overwrite_function_params

# Schemas: workflow/schemas/ (shipped in the package, so the command line validates alike).
config.update(validate_config(config, source="config"))
DATASETS = read_dataset_sheet(config["datasets"])
DATASET_NAMES = sorted(DATASETS.index)
SPECIES = sorted(DATASETS["species"].unique())
PROJECT = config["project_path"]
# The sheet's rows as plain dicts: input and params functions run once per job, thousands of
# times while planning, and a dict lookup costs a fraction of a pandas one.
ROWS = DATASETS.to_dict(orient="index")

# Files written by demo_corpus: datasets under them are planned before they exist.
DEMO_FILES = [str(p) for p in demo_files(config["demo"]["path"])]
# The input name of a dataset whose path cannot be read while planning: its one job fails
# with the reason, and the other datasets go on.
UNREADABLE = "_unreadable_dataset_"


def job_function(func):
    """Mark an input, params or resources function that Snakemake calls for every job.

    Snakemake reads the parameters of such a function on each call (`inspect.signature`, a
    few times per job: ~6% of planning 10,000 datasets) unless the function carries them, as
    its own wrappers do (snakemake.ioutils.subpath); they are read here once.
    """
    overwrite_function_params(func, inspect.signature(func).parameters)
    return func


def out(path):
    """A path under the project directory."""
    return f"{PROJECT}/{path}"


def as_json(value):
    """Params as canonical JSON, so equal settings always compare equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def datasets_of(species):
    return [name for name in DATASET_NAMES if ROWS[name]["species"] == species]


def per_dataset(pattern, datasets=None):
    """`pattern` (a path under the project, with {dataset}) for each dataset (default: all)."""
    names = DATASET_NAMES if datasets is None else datasets
    return [out(pattern.format(dataset=name)) for name in names]


def has_reference(species):
    return species in bundled_species() or species in config["reference"]["tables"]


# --- the inputs of each dataset ----------------------------------------------------------


def _lamin_sources(dataset, reference):
    """The files of a lamin:// dataset, resolved in the source instance while planning."""
    from cellfoundry.lamin import connect, resolve_source

    connect(
        config["lamin"]["source_instance"] or None,
        settings_dir=config["lamin"]["source_settings_dir"] or None,
    )
    paths = resolve_source(reference)
    return {output_name(p): SourceFile(output_name(p), p, "") for p in paths}


# Why a dataset's inputs could not be listed while planning: its one job fails with it.
PLANNING_ERRORS = {}


def _sources(dataset):
    path = ROWS[dataset]["path"]
    try:
        if path.startswith("lamin://"):
            return _lamin_sources(dataset, path)
        return dataset_sources(dataset, path, planned=DEMO_FILES).by_name()
    except CellfoundryError as error:
        PLANNING_ERRORS[dataset] = str(error)
        return {UNREADABLE: None}


SOURCES = {dataset: _sources(dataset) for dataset in DATASET_NAMES}


@job_function
def planning_error(wildcards):
    return PLANNING_ERRORS.get(wildcards.dataset, "")


def files_of(dataset):
    return sorted(SOURCES[dataset])


def keep_going_in_group_job():
    """Inside a group job, keep running the other members after one fails.

    profiles/slurm groups the many small preparation jobs: a group job runs its members in one
    Snakemake process inside the Slurm job, which is started without --keep-going and would stop
    at its first failed member (snakemake/snakemake#2508), leaving the good files queued behind a
    bad one unprocessed. Execution settings reach the workflow only after the Snakefile is parsed
    and before the job graph is built, so the input functions of the grouped rules set it.
    The profile's keep-incomplete keeps what the finished members wrote.
    """
    settings = workflow.execution_settings
    if workflow.remote_exec and settings is not None and not settings.keep_going:
        settings.keep_going = True


def per_file(pattern):
    """An input function: `pattern` (with {dataset} and {file}) for each file of the dataset."""

    @job_function
    def paths(wildcards):
        keep_going_in_group_job()
        return [
            out(pattern.format(dataset=wildcards.dataset, file=name))
            for name in files_of(wildcards.dataset)
        ]

    return paths


# --- reference -------------------------------------------------------------------------


def reference_table(wildcards):
    return config["reference"]["tables"].get(wildcards.species, [])


@job_function
def reference_of(wildcards):
    return REFERENCE_OF.get(wildcards.dataset, [])


# --- preprocess ------------------------------------------------------------------------


@job_function
def dataset_path(wildcards):
    return ROWS[wildcards.dataset]["path"]


@job_function
def file_path(wildcards):
    """The input's path as the job reads it (a lamin:// dataset's file is a local path)."""
    source = SOURCES[wildcards.dataset].get(wildcards.file)
    if source is not None and dataset_path(wildcards).startswith("lamin://"):
        return str(source.path)
    return dataset_path(wildcards)


@job_function
def file_input(wildcards):
    """What the job reads: the file, or every file of an MTX folder (so a file rewritten in
    place reruns the job); nothing for a dataset that cannot be read (its job says why).
    """
    keep_going_in_group_job()
    source = SOURCES[wildcards.dataset].get(wildcards.file)
    if source is None:
        return []
    if Path(source.path).is_dir():
        return sorted(str(p) for p in Path(source.path).iterdir() if p.is_file())
    return str(source.path)


# Per-dataset values of the params, worked out once (not once per job and per use).
SETTINGS = {name: as_json(dataset_settings(config, row)) for name, row in ROWS.items()}
REFERENCE_OF = {
    name: out(f"references/genes/{row['species']}.parquet")
    for name, row in ROWS.items()
    if has_reference(row["species"])
}


@job_function
def preprocess_settings(wildcards):
    return SETTINGS[wildcards.dataset]


@job_function
def species_of(wildcards):
    return ROWS[wildcards.dataset]["species"]


def input_mb(wildcards, input):
    """MB of the file a job reads (or of all files of an MTX folder)."""
    data = (input.data,) if isinstance(input.data, str) else tuple(input.data)
    return _size_mb(data)


@functools.lru_cache(maxsize=4)
def _size_mb(paths):
    """Memory and runtime of a job both ask for its input's size: one stat per file."""
    return sum(os.stat(p).st_size for p in paths if os.path.exists(p)) / 2**20


@job_function
def preprocess_mem_mb(wildcards, input, attempt):
    """Memory of a preprocessing job: blocks and per-gene statistics (~1.5 GB) plus a few
    bytes per cell, estimated from the input's size; doubled on a retry."""
    return int((1500 + input_mb(wildcards, input) / 20) * attempt)


@job_function
def preprocess_runtime(wildcards, input, attempt):
    """Minutes: at ~20 MB/s of input, at least 10."""
    return int(max(10, input_mb(wildcards, input) / 20 / 60 * 2) * attempt)


def species_gene_stats(wildcards):
    return per_dataset(
        "stats/datasets/{dataset}.parquet", datasets_of(wildcards.species)
    )


# --- vocabulary and panels -------------------------------------------------------------


def vocabulary_import(wildcards):
    return config["vocabulary"]["import"].get(wildcards.species, [])


def medians_import(wildcards):
    return config["vocabulary"]["import_medians"].get(wildcards.species, [])


def user_panels(species):
    return config["panels"]["user"].get(species, {})


def user_panel_source(wildcards):
    return user_panels(wildcards.species)[wildcards.panel]


def panel_names(species):
    return ["hvg", *sorted(user_panels(species))]


USER_PANEL_NAMES = sorted(
    {name for species in SPECIES for name in user_panels(species)}
)


# --- splits and shards -----------------------------------------------------------------


def uses_default_split():
    return not config["splits"]["train"] and not config["splits"]["val"]


def split_files():
    """The config's split files (inputs of the split expansion)."""
    names = set()
    for items in (config["splits"]["train"], config["splits"]["val"]):
        names |= {item if isinstance(item, str) else item["source"] for item in items}
    return [f"{config['splits']['dir']}/{name}.yaml" for name in sorted(names)]


def default_split_outputs():
    """The folder of the default split's files, splits/<dataset>.yaml, when it is used.

    One folder, not a file per dataset: Snakemake spells out a job's outputs each time a job
    it waits for finishes, so ten thousand listed files made planning quadratic (8 of 63 CPU
    seconds at 10,000 datasets). The folder holds nothing else; a split file deleted by hand
    comes back when the split next runs.
    """
    if not uses_default_split():
        return []
    return directory(out("splits"))


def project_of_manifest(wildcards, output):
    """The project directory, from the manifest's path (<project>/manifests/splits.parquet)."""
    return str(Path(output.manifest).parent.parent)


def shard_manifests(datasets=None):
    return per_dataset("shards/{dataset}/manifest.json", datasets)


# --- gene embeddings and training ------------------------------------------------------

EMBEDDINGS = sorted(config["embeddings"])
TRAIN_RUN = config["train"]["run"]


def species_shard_manifests(wildcards):
    """The shard manifests of a species' datasets: a gene embedding depends on nothing else."""
    return shard_manifests(datasets_of(wildcards.species))


def embedding_settings(wildcards):
    return as_json(config["embeddings"][wildcards.embedding])


def embedding_outputs():
    return expand(
        out("references/embeddings/{embedding}/{species}.csv"),
        embedding=EMBEDDINGS,
        species=SPECIES,
    )


def training_gene_embeddings():
    name = config["train"]["gene_embeddings"]
    if name is None:
        return []
    if name not in config["embeddings"]:
        raise ValueError(
            f"config: train.gene_embeddings: '{name}' is not an entry of `embeddings`"
        )
    return expand(
        out("references/embeddings/{embedding}/{species}.csv"),
        embedding=[name],
        species=SPECIES,
    )


def training_panels():
    """Panels the objective reads: all of each species' (contrastive) or the named ones."""
    if config["train"]["objective"] not in ("contrastive", "diffusion"):
        return []
    names = config["train"]["panels"]
    return [
        out(f"panels/{species}/{name}.csv")
        for species in SPECIES
        for name in panel_names(species)
        if names is None or name in names
    ]


def evaluation_files():
    """Held-out files the training's evaluation reads (datasets of the sheet: their shards)."""
    if not config["eval"]["enabled"] or config["eval"]["datasets"] == "auto":
        return []
    return [entry["file"] for entry in config["eval"]["datasets"] if "file" in entry]


def model_outputs():
    if not config["train"]["enabled"]:
        return []
    return [
        out(f"model_checkpoints/{TRAIN_RUN}/final/model.safetensors"),
        out(f"report/training_{TRAIN_RUN}.png"),
        out(f"report/cell_embeddings_{TRAIN_RUN}"),
        out(f"report/evaluation_{TRAIN_RUN}"),
    ]


def panel_reports():
    return [
        out(f"qc/panels/{species}/{name}.json")
        for species in SPECIES
        for name in panel_names(species)
    ]


def all_h5ads(datasets):
    """The preprocessed h5ads of some datasets."""
    return [
        out(f"data/{dataset}/h5ads/{name}.h5ad")
        for dataset in datasets
        for name in files_of(dataset)
    ]


# --- LaminDB ---------------------------------------------------------------------------


@job_function
def lamin_dataset_params(wildcards):
    return as_json(
        {
            "source": dataset_path(wildcards),
            "preprocess": json.loads(preprocess_settings(wildcards)),
        }
    )


@job_function
def lamin_dataset_sources(wildcards):
    return [
        str(source.path)
        for source in SOURCES[wildcards.dataset].values()
        if source is not None
    ]


@job_function
def lamin_dataset_h5ads(wildcards):
    return all_h5ads([wildcards.dataset])


def lamin_species_dataset_receipts(wildcards):
    return per_dataset("lamin/data/{dataset}.json", datasets_of(wildcards.species))


def lamin_species_h5ads(wildcards):
    return all_h5ads(datasets_of(wildcards.species))


def lamin_species_panels(wildcards):
    return [
        out(f"panels/{wildcards.species}/{name}.csv")
        for name in panel_names(wildcards.species)
    ]


def lamin_species_embeddings(wildcards):
    return expand(
        out("references/embeddings/{embedding}/{species}.csv"),
        embedding=EMBEDDINGS,
        species=[wildcards.species],
    )


def lamin_reference_params(wildcards):
    return as_json(
        {
            "vocabulary": config["vocabulary"],
            "panels": config["panels"],
            "embeddings": config["embeddings"],
        }
    )


def project_of_receipt(wildcards, output):
    """The project directory, from a receipt's path (<project>/lamin/<kind>/<name>.json)."""
    return str(Path(output[0]).parents[2])


def folder_of_model(wildcards, input):
    """The exported model folder, from its weights (<folder>/model.safetensors)."""
    return str(Path(input.model).parent)


def run_dir_of_model(wildcards, output):
    """The run's folder, from the exported weights (<run>/final/model.safetensors)."""
    return str(Path(output.model).parent.parent)


def lamin_outputs():
    if not config["lamin"]["register"]:
        return []
    targets = expand(out("lamin/references/{species}.json"), species=SPECIES)
    if config["train"]["enabled"]:
        targets.append(out(f"lamin/model/{TRAIN_RUN}.json"))
    return targets


# --- targets ---------------------------------------------------------------------------


def prep_outputs():
    # Every dataset's outputs (qc/, provenance/, stats/, shards/, data/) come with these two:
    # the shard manifest and the corpus report read every dataset's, and a job makes all its
    # outputs, so listing each dataset's files again would only slow planning.
    targets = [out("manifests/shards.parquet"), out("report/datasets.tsv")]
    for species in SPECIES:
        targets.append(
            out(f"references/vocabulary/token_mappings_per_specie/{species}.csv")
        )
        targets += [
            out(f"panels/{species}/{name}.csv") for name in panel_names(species)
        ]
    return targets


# --- demo ------------------------------------------------------------------------------


def demo_folder(wildcards, output):
    """The demo folder: the common parent of the files the demo rule writes."""
    return os.path.commonpath(list(output))


def demo_cells_argument():
    n_cells = config["demo"]["n_cells"]
    return "" if n_cells is None else f"--n-cells {n_cells}"


def dataset_species_json():
    return as_json({name: ROWS[name]["species"] for name in DATASET_NAMES})
