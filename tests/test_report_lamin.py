"""LaminDB as a source and a registry.

One small project runs the whole pipeline: two datasets come from plain files, two from a real
local LaminDB instance (an artifact and a collection), and every output is registered in the
project's own instance. (The report in a real browser: tests/test_workflow.py, on the report
the README's command builds from the demo run, with or without LaminDB.)
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from cellfoundry.demo import DEMO_DATASETS
from conftest import REPO, SMALL_PROJECT, Project, run

pytestmark = [pytest.mark.slow, pytest.mark.lamin]

SOURCE = """
import sys
from pathlib import Path
from cellfoundry.demo import write_demo_corpus
from cellfoundry.lamin import init_instance

storage, settings = Path(sys.argv[1]), Path(sys.argv[2])
write_demo_corpus(storage / "corpus", seed=7, n_cells=120)
init_instance(storage, name="corpus", settings_dir=settings)
import lamindb as ln

ln.Artifact(storage / "corpus" / "demo_pbmc_symbols.h5ad", key="corpus/pbmc_symbols.h5ad").save()
looms = [ln.Artifact(p, key=f"corpus/retina/{p.name}").save() for p in sorted((storage / "corpus" / "demo_retina").glob("*.loom"))]
ln.Collection(looms, key="retina").save()
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    pytest.importorskip("lamindb")
    root = tmp_path_factory.mktemp("lamin-report")
    source, settings = root / "source", root / "source-settings"
    made = run(
        [sys.executable, "-c", textwrap.dedent(SOURCE), str(source), str(settings)], cwd=root
    )
    assert made.returncode == 0, made.stdout[-3000:]
    rows = [
        {"dataset": d.name, "species": d.species, "path": str(root / "demo" / d.path)}
        for d in DEMO_DATASETS
        if d.name in ("demo_pbmc_ids", "demo_brain")
    ]
    rows += [
        {
            "dataset": "lamin_pbmc",
            "species": "hsapiens",
            "path": "lamin://artifact/corpus/pbmc_symbols.h5ad",
        },
        {"dataset": "lamin_retina", "species": "mmusculus", "path": "lamin://collection/retina"},
    ]
    lamin = {
        "register": True,
        "source_instance": "anonymous/corpus",
        "source_settings_dir": str(settings),
    }
    project = Project(root, rows, {**SMALL_PROJECT, "lamin": lamin})
    result = project.snakemake(timeout=2400)
    assert result.returncode == 0, result.stdout[-6000:]
    return project


def test_lamin_datasets_are_materialised(project):
    retina = sorted(
        p.name for p in (project.results / "data" / "lamin_retina" / "h5ads").glob("*.h5ad")
    )
    assert retina == ["retina_batch1.h5ad", "retina_batch2.h5ad"]
    provenance = json.loads((project.results / "provenance" / "lamin_pbmc.json").read_text())
    assert provenance["config"]["input"] == "lamin://artifact/corpus/pbmc_symbols.h5ad"
    assert provenance["inputs"][0]["file"].endswith("pbmc_symbols.h5ad")


def test_model_lineage_names_its_training_data(project):
    result = run(
        [sys.executable, "-m", "cellfoundry", "lamin-lineage", "--project", str(project.results), "--name",
         "cellfoundry", "--artifact", str(project.results / "model_checkpoints" / "demo" / "final")],
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    keys = [line.split("\t")[0] for line in result.stdout.splitlines() if "\t" in line]
    for name in ("demo_pbmc_ids", "demo_brain", "lamin_pbmc"):
        assert any(k.startswith(f"data/{name}/h5ads/") for k in keys), keys
    assert "references/vocabulary/token_mappings_per_specie/hsapiens.csv" in keys
    # ... and, one step further back, the raw files the h5ads were made from.
    assert any(k.endswith("demo_pbmc_ids.h5ad") and not k.startswith("data/") for k in keys), keys


def test_registration_is_idempotent(project):
    receipt = project.results / "lamin" / "model" / "demo.json"
    first = json.loads(receipt.read_text())
    again = project.snakemake(
        "--forcerun", "lamin_register_model", "--until", "lamin_register_model"
    )
    assert again.returncode == 0, again.stdout[-3000:]
    second = json.loads(receipt.read_text())
    assert second["reused"] is True
    assert second["outputs"] == first["outputs"] and second["run"] == first["run"]


def test_unknown_lamin_reference_fails_its_dataset(project, tmp_path):
    rows = [
        *project.datasets,
        {"dataset": "missing", "species": "hsapiens", "path": "lamin://artifact/corpus/nope.h5ad"},
    ]
    config = project.write(rows, project.config, name="-missing")
    result = project.snakemake("--until", "preprocess", config=config)
    assert result.returncode != 0
    (log_file,) = (project.results / "logs" / "preprocess" / "missing").glob("*.log")
    log = log_file.read_text()
    assert "lamin://artifact/corpus/nope.h5ad" in log
    assert not (project.results / "data" / "missing").exists()
