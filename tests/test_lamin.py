"""LaminDB as source and registry, on a real local SQLite instance, offline, without mocks.

The instance lives in a temporary project directory: its storage root, its `.lamindb/`
database and its `.lamin/` settings, so no test writes to the home directory or to the
working directory. lamindb reads its settings directory once, on import, so the module's
instance is made before lamindb is imported; everything that needs a second instance or no
instance runs in a fresh process, as a Snakemake job would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellfoundry.lamin import (
    LaminError,
    is_lamin_reference,
    lamin_environment,
    lineage_of,
    parse_reference,
    register_outputs,
    resolve_source,
)

INSTANCE = "cftest"
SLUG = f"anonymous/{INSTANCE}"
TIMINGS: dict[str, float] = {}


def write_h5ad(path: Path, *, seed: int, n_cells: int = 20) -> Path:
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(1.0, (n_cells, 12)).astype(np.float32)),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(12)]),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any LAMIN_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMIN")}
    return {**env, **extra}


def run_python(code: str, *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
        check=False,
    )


# --- references, no lamindb needed ---------------------------------------------------------


def test_reference_syntax() -> None:
    assert is_lamin_reference("lamin://artifact/abc")
    assert not is_lamin_reference("data/pbmc.h5ad")
    assert not is_lamin_reference(Path("lamin://artifact/abc"))
    ref = parse_reference("lamin://artifact/corpora/2024/pbmc.h5ad")
    assert (ref.registry, ref.identifier) == ("artifact", "corpora/2024/pbmc.h5ad")
    assert str(ref) == "lamin://artifact/corpora/2024/pbmc.h5ad"
    assert parse_reference("lamin://collection/Abc123Abc123Abc1").registry == "collection"


@pytest.mark.parametrize(
    "reference",
    ["lamin://dataset/x", "lamin://artifact/", "lamin://artifact/x/", "lamin:artifact/x"],
)
def test_bad_reference_is_named(reference: str) -> None:
    with pytest.raises(LaminError, match=re.escape(f"'{reference}'")):
        parse_reference(reference)


# --- a real instance ------------------------------------------------------------------------


def lamin_in_home() -> dict[str, list[str] | None]:
    """What lamindb keeps in the home directory by default: settings and cache."""
    folders = (Path.home() / ".lamin", Path.home() / ".cache" / "lamindb")
    return {str(f): sorted(os.listdir(f)) if f.is_dir() else None for f in folders}


@pytest.fixture(scope="module")
def home_before() -> dict[str, list[str] | None]:
    return lamin_in_home()


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory, home_before: dict[str, list[str] | None]
) -> Iterator[Path]:
    """A project directory that is the storage root of a fresh instance, with two datasets."""
    if "lamindb_setup" in sys.modules:
        pytest.skip("lamindb was imported earlier in this session, with other settings")
    root = tmp_path_factory.mktemp("lamin-project")
    scratch = tmp_path_factory.mktemp("lamin-scratch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAMIN_SETTINGS_DIR", str(root))
        mp.setenv("LAMIN_CACHE_DIR", str(scratch / "cache"))
        mp.delenv("LAMIN_CURRENT_INSTANCE", raising=False)
        pytest.importorskip("lamindb")
        from cellfoundry.lamin import init_instance

        start = time.perf_counter()
        assert init_instance(root, name=INSTANCE, settings_dir=root) == SLUG
        TIMINGS["init"] = time.perf_counter() - start
        write_h5ad(root / "data" / "a.h5ad", seed=1)
        write_h5ad(root / "data" / "b.h5ad", seed=2)
        yield root


@pytest.fixture(scope="module")
def ln(project: Path) -> Any:
    import lamindb

    return lamindb


@pytest.fixture(scope="module")
def datasets(ln: Any, project: Path) -> dict[str, Any]:
    """Two AnnData artifacts and a collection of both, as a user would have registered them."""
    a = ln.Artifact.from_anndata(project / "data" / "a.h5ad", key="data/a.h5ad").save()
    b = ln.Artifact.from_anndata(project / "data" / "b.h5ad", key="data/b.h5ad").save()
    corpus = ln.Collection([a, b], key="corpora/demo", description="two datasets").save()
    return {"a": a, "b": b, "corpus": corpus}


@pytest.mark.lamin
def test_instance_stays_in_project(
    project: Path, home_before: dict[str, list[str] | None], repo: Path
) -> None:
    assert (project / ".lamindb" / "lamin.db").is_file()
    assert (project / ".lamin" / f"instance--anonymous--{INSTANCE}.env").is_file()
    # lamindb marks the working directory of `init`; it must be the project, not ours
    assert (project / ".lamin" / "current_instance").read_text().strip() == SLUG
    assert not (repo / ".lamin").exists()
    assert lamin_in_home() == home_before


@pytest.mark.lamin
def test_resolve_artifact_by_uid_stem_and_key(project: Path, datasets: dict[str, Any]) -> None:
    a = datasets["a"]
    path = project / "data" / "a.h5ad"
    for reference in (
        f"lamin://artifact/{a.uid}",
        f"lamin://artifact/{a.uid[:16]}",
        "lamin://artifact/data/a.h5ad",
    ):
        assert resolve_source(reference) == [path]
    # registered in place: the same file, not a copy
    assert os.path.samefile(resolve_source("lamin://artifact/data/a.h5ad")[0], path)
    assert ad.read_h5ad(path).n_obs == 20


@pytest.mark.lamin
def test_resolve_collection_in_its_order(project: Path, datasets: dict[str, Any]) -> None:
    expected = [project / "data" / "a.h5ad", project / "data" / "b.h5ad"]
    assert resolve_source("lamin://collection/corpora/demo") == expected
    assert resolve_source(f"lamin://collection/{datasets['corpus'].uid}") == expected
    assert [ad.read_h5ad(p).n_obs for p in expected] == [20, 20]


@pytest.mark.lamin
@pytest.mark.parametrize(
    "reference",
    [
        "lamin://artifact/data/missing.h5ad",
        "lamin://artifact/AAAAAAAAAAAAAAAA",
        "lamin://collection/data/a.h5ad",
    ],
)
def test_unknown_reference_is_named(datasets: dict[str, Any], reference: str) -> None:
    with pytest.raises(LaminError, match=f"reference '{reference}': no (artifact|collection)"):
        resolve_source(reference)


@pytest.mark.lamin
def test_file_overwritten_since_registration_is_refused(ln: Any, project: Path) -> None:
    note = project / "data" / "note.txt"
    note.write_text("aaaa")
    ln.Artifact(note, key="data/note.txt").save()
    note.write_text("bbbb")  # same size: only the hash tells
    later = time.time() + 5
    os.utime(note, (later, later))
    with pytest.raises(
        LaminError, match=r"note\.txt no longer holds artifact .* the file was overwritten$"
    ):
        resolve_source("lamin://artifact/data/note.txt")


def write_pipeline_outputs(project: Path) -> None:
    """What a pipeline run writes: preprocessed datasets, a token mapping, a model export."""
    results = project / "results"
    for name in ("a", "b"):
        write_h5ad(results / "preprocessed" / f"{name}.h5ad", seed=10 + ord(name), n_cells=15)
    mapping = results / "vocabulary" / "token_mapping.csv"
    mapping.parent.mkdir(parents=True, exist_ok=True)
    mapping.write_text("gene_id,token\nENSG00000000000,4\n")
    model = results / "model" / "export"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text('{"d_model": 8}\n')
    (model / "model.safetensors").write_bytes(b"\0" * 64)


def register_pipeline(project: Path) -> dict[str, Any]:
    """Register the outputs as each rule's job would, one call per job."""
    results = project / "results"
    preprocessed = [results / "preprocessed" / f"{n}.h5ad" for n in ("a", "b")]
    mapping = results / "vocabulary" / "token_mapping.csv"
    registrations = {}
    for name, path in zip(("a", "b"), preprocessed, strict=True):
        registrations[name] = register_outputs(
            [path],
            transform_key="cellfoundry/preprocess",
            transform_version="1",
            params={"min_genes": 3, "dataset": name},
            inputs=[f"lamin://artifact/data/{name}.h5ad"],
            description=f"preprocessed {name}",
        )
    registrations["vocabulary"] = register_outputs(
        [mapping],
        transform_key="cellfoundry/vocabulary",
        transform_version="1",
        params={"min_cells": 1},
        inputs=preprocessed,
    )
    start = time.perf_counter()
    registrations["model"] = register_outputs(
        [results / "model" / "export"],
        transform_key="cellfoundry/export_model",
        transform_version="1",
        params={"epochs": 1, "objective": "mlm"},
        inputs=[*preprocessed, mapping],
        kind="model",
    )
    TIMINGS["register model"] = time.perf_counter() - start
    return registrations


@pytest.fixture(scope="module")
def pipeline(project: Path, datasets: dict[str, Any]) -> dict[str, Any]:
    write_pipeline_outputs(project)
    return register_pipeline(project)


@pytest.mark.lamin
def test_register_outputs_records_rule_params_and_inputs(
    ln: Any, project: Path, datasets: dict[str, Any], pipeline: dict[str, Any]
) -> None:
    pre_a = ln.Artifact.get(pipeline["a"].outputs[0])
    assert pre_a.key == "results/preprocessed/a.h5ad"
    assert pre_a.otype == "AnnData"
    assert pre_a.n_observations == 15
    assert Path(str(pre_a.path)) == project / "results" / "preprocessed" / "a.h5ad"
    run = pre_a.run
    assert (run.transform.key, run.transform.version, run.transform.kind) == (
        "cellfoundry/preprocess",
        "1",
        "pipeline",
    )
    assert run.params == {"dataset": "a", "min_genes": 3}
    assert run.status == "completed"
    assert [x.uid for x in run.input_artifacts.all()] == [datasets["a"].uid]
    model = ln.Artifact.get(pipeline["model"].outputs[0])
    assert (model.kind, model.n_files, model.key) == ("model", 2, "results/model/export")
    # nothing was copied or moved: only the database and the lock beside it
    assert {p.name for p in (project / ".lamindb").iterdir()} == {
        "cellfoundry.lock",
        "lamin.db",
        "storage_uid.txt",
    }


@pytest.mark.lamin
def test_lineage_answers_what_a_model_was_trained_on(
    ln: Any, datasets: dict[str, Any], pipeline: dict[str, Any]
) -> None:
    model = ln.Artifact.get(pipeline["model"].outputs[0])
    start = time.perf_counter()
    lineage = lineage_of(model)
    TIMINGS["lineage query"] = time.perf_counter() - start
    assert [a.key for a in lineage] == [
        "results/preprocessed/a.h5ad",
        "results/preprocessed/b.h5ad",
        "results/vocabulary/token_mapping.csv",
        "data/a.h5ad",
        "data/b.h5ad",
    ]
    trained_on = [a.key for a in lineage if a.key.startswith("results/preprocessed/")]
    assert trained_on == ["results/preprocessed/a.h5ad", "results/preprocessed/b.h5ad"]
    assert lineage_of(f"lamin://artifact/{model.uid}") == lineage
    # the same question the other way round, as one query: which models used dataset a?
    models = ln.Artifact.filter(
        kind="model", run__input_artifacts__run__input_artifacts=datasets["a"]
    ).distinct()
    assert [m.uid for m in models] == [model.uid]


@pytest.mark.lamin
def test_registering_again_writes_nothing(
    ln: Any, project: Path, datasets: dict[str, Any], pipeline: dict[str, Any]
) -> None:
    counts = (ln.Artifact.filter().count(), ln.Run.filter().count(), ln.Transform.filter().count())
    start = time.perf_counter()
    again = register_pipeline(project)
    TIMINGS["re-register pipeline"] = time.perf_counter() - start
    for name, registration in again.items():
        assert registration.reused, name
        assert registration.outputs == pipeline[name].outputs
        assert registration.run == pipeline[name].run
    assert (
        ln.Artifact.filter().count(),
        ln.Run.filter().count(),
        ln.Transform.filter().count(),
    ) == counts


@pytest.mark.lamin
def test_new_params_new_run_new_content_new_version(
    ln: Any, project: Path, datasets: dict[str, Any], pipeline: dict[str, Any]
) -> None:
    mapping = project / "results" / "vocabulary" / "token_mapping.csv"
    first = pipeline["vocabulary"]
    inputs = [project / "results" / "preprocessed" / f"{n}.h5ad" for n in ("a", "b")]

    rerun = register_outputs(
        [mapping],
        transform_key="cellfoundry/vocabulary",
        transform_version="1",
        params={"min_cells": 2},
        inputs=inputs,
    )
    assert not rerun.reused
    assert rerun.run != first.run
    assert rerun.outputs == first.outputs  # same bytes, same artifact
    artifact = ln.Artifact.get(first.outputs[0])
    assert artifact.run.uid == first.run
    assert [r.uid for r in artifact.recreating_runs.all()] == [rerun.run]

    mapping.write_text("gene_id,token\nENSG00000000000,4\nENSG00000000001,5\n")
    changed = register_outputs(
        [mapping],
        transform_key="cellfoundry/vocabulary",
        transform_version="2",
        params={"min_cells": 2},
        inputs=inputs,
    )
    new = ln.Artifact.get(changed.outputs[0])
    assert new.uid[:16] == artifact.uid[:16]  # a new version of the same key
    assert new.uid != artifact.uid
    assert new.is_latest
    assert not ln.Artifact.get(artifact.uid).is_latest
    assert resolve_source("lamin://artifact/results/vocabulary/token_mapping.csv") == [mapping]
    # the old version was registered in place, so its file now holds the new content
    with pytest.raises(LaminError, match="overwritten by a later version"):
        resolve_source(f"lamin://artifact/{artifact.uid}")
    assert new.run.transform.version == "2"
    assert ln.Transform.filter(key="cellfoundry/vocabulary").count() == 2
    assert [a.key for a in lineage_of(new)][:2] == [
        "results/preprocessed/a.h5ad",
        "results/preprocessed/b.h5ad",
    ]


@pytest.mark.lamin
def test_key_prefix_and_collection_input(ln: Any, project: Path, datasets: dict[str, Any]) -> None:
    panel = project / "results" / "panels" / "panel.csv"
    panel.parent.mkdir(parents=True, exist_ok=True)
    panel.write_text("gene_id\nENSG00000000000\n")
    registration = register_outputs(
        [panel],
        transform_key="cellfoundry/panels",
        transform_version="1",
        inputs=["lamin://collection/corpora/demo"],
        key_prefix="cellfoundry/panels",
    )
    assert registration.keys == ("cellfoundry/panels/panel.csv",)
    artifact = ln.Artifact.get(registration.outputs[0])
    assert Path(str(artifact.path)) == panel
    assert [c.key for c in artifact.run.input_collections.all()] == ["corpora/demo"]
    assert [a.key for a in lineage_of(artifact)] == ["data/a.h5ad", "data/b.h5ad"]
    # a later rule that names the panel by path finds it, whatever its key
    summary = panel.with_name("summary.txt")
    summary.write_text("1 gene\n")
    downstream = register_outputs(
        [summary],
        transform_key="cellfoundry/panel_summary",
        transform_version="1",
        inputs=[panel],
    )
    assert downstream.inputs == registration.outputs


@pytest.mark.lamin
def test_input_outside_project_is_hard_linked(
    ln: Any, project: Path, tmp_path: Path, datasets: dict[str, Any]
) -> None:
    raw = write_h5ad(tmp_path / "shared" / "raw.h5ad", seed=5)
    out = project / "results" / "preprocessed" / "raw.h5ad"
    write_h5ad(out, seed=6)
    registration = register_outputs(
        [out],
        transform_key="cellfoundry/preprocess",
        transform_version="1",
        inputs=[raw],
    )
    (parent,) = lineage_of(ln.Artifact.get(registration.outputs[0]))
    linked = Path(str(parent.path))
    assert linked.is_relative_to(project / ".cellfoundry" / "lamin-external")
    assert os.path.samefile(linked, raw)


@pytest.mark.lamin
def test_folder_outside_project_is_refused(
    project: Path, tmp_path: Path, datasets: dict[str, Any]
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(LaminError, match=f"output {folder} is outside the storage root"):
        register_outputs([folder], transform_key="cellfoundry/export_model", transform_version="1")
    with pytest.raises(LaminError, match="does not exist"):
        register_outputs([tmp_path / "none.h5ad"], transform_key="x", transform_version="1")
    with pytest.raises(LaminError, match="params are not JSON"):
        register_outputs(
            [project / "data" / "a.h5ad"],
            transform_key="x",
            transform_version="1",
            params={"when": object()},
        )


@pytest.mark.lamin
def test_separate_process_finds_the_instance(
    ln: Any, project: Path, tmp_path: Path, datasets: dict[str, Any]
) -> None:
    """A job in another directory gets the instance from two variables and registers into it."""
    out = project / "results" / "job" / "out.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("x\n1\n")
    env = clean_env(HOME=str(tmp_path), **lamin_environment(SLUG, settings_dir=project))
    start = time.perf_counter()
    result = run_python(
        f"""
        from cellfoundry.lamin import register_outputs, resolve_source
        print(resolve_source("lamin://collection/corpora/demo")[1])
        r = register_outputs([{str(out)!r}], transform_key="cellfoundry/job",
                             transform_version="1", inputs=["lamin://artifact/data/b.h5ad"])
        print("RUN", r.run)
        """,
        cwd=tmp_path,
        env=env,
    )
    TIMINGS["job process (import+resolve+register)"] = time.perf_counter() - start
    assert result.returncode == 0, result.stderr + result.stdout
    assert str(project / "data" / "b.h5ad") in result.stdout
    run_uid = result.stdout.split("RUN ")[-1].strip()
    assert [a.key for a in ln.Run.get(run_uid).input_artifacts.all()] == ["data/b.h5ad"]
    assert not (tmp_path / ".lamin").exists()


@pytest.mark.lamin
def test_concurrent_jobs_share_one_transform(
    ln: Any, project: Path, tmp_path: Path, datasets: dict[str, Any]
) -> None:
    """Parallel Snakemake jobs of one rule: get-or-create of the transform must not race."""
    env = clean_env(HOME=str(tmp_path), **lamin_environment(SLUG, settings_dir=project))
    code = """
        import sys
        from pathlib import Path
        from cellfoundry.lamin import register_outputs
        out = Path(sys.argv[1])
        out.write_text(out.name)
        register_outputs([out], transform_key="cellfoundry/parallel", transform_version="1",
                         params={"job": out.name}, inputs=["lamin://artifact/data/a.h5ad"])
        """
    (project / "results" / "parallel").mkdir(parents=True, exist_ok=True)
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(code),
                str(project / "results" / "parallel" / f"{i}.txt"),
            ],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(3)
    ]
    for job in jobs:
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, output
    assert ln.Transform.filter(key="cellfoundry/parallel").count() == 1
    assert ln.Run.filter(transform__key="cellfoundry/parallel").count() == 3
    assert ln.Artifact.filter(key__startswith="results/parallel/").count() == 3


@pytest.mark.lamin
def test_no_or_unknown_instance_is_a_clear_error(tmp_path: Path, datasets: dict[str, Any]) -> None:
    code = """
        import sys
        from cellfoundry.lamin import LaminError, connect, resolve_source
        try:
            if len(sys.argv) > 1:
                connect(sys.argv[1], settings_dir=".")
            resolve_source("lamin://artifact/data/a.h5ad")
        except LaminError as error:
            print("LaminError:", error)
        """
    env = clean_env(HOME=str(tmp_path), LAMIN_SETTINGS_DIR=str(tmp_path))
    none = run_python(code, cwd=tmp_path, env=env)
    assert "LaminError: no LaminDB instance is configured" in none.stdout, none.stderr
    unknown = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), "anonymous/nope"],
        cwd=tmp_path,
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert "LaminError: cannot connect to LaminDB instance 'anonymous/nope'" in unknown.stdout, (
        unknown.stderr
    )


@pytest.mark.lamin
def test_timings_are_small(pipeline: dict[str, Any]) -> None:
    """Offline, nothing waits on the network: init, a registration and a query take well under seconds."""
    print("lamin timings (s):", {k: round(v, 3) for k, v in TIMINGS.items()})
    assert TIMINGS["init"] < 30
    assert TIMINGS["register model"] < 10
