"""LaminDB as an optional source of datasets and registry of pipeline outputs, offline.

Nothing here is needed to read local files: the pipeline uses LaminDB only when a dataset
sheet names a `lamin://` reference or the config asks for outputs to be registered.
`lamindb` is imported lazily, so this module imports without it (extra `cellfoundry[lamin]`).

References in a dataset sheet::

    lamin://artifact/<uid or key>
    lamin://collection/<uid or key>

A uid is 16 characters (the latest version) or 20 characters (one exact version); anything
else, or a uid that matches nothing, is read as a key, which may contain slashes.

Everything works on a local SQLite instance without network, given two rules found by
trying (see `tests/LAMIN_FINDINGS.md`):

- A file is registered in place, without a copy and without a call to the hub, only when it
  lies under the instance's storage root. The pipeline therefore makes the project directory
  the storage root; a file outside it is hard-linked under
  `<root>/.cellfoundry/lamin-external/` first.
- LaminDB keeps its settings in `$LAMIN_SETTINGS_DIR/.lamin` (default `~/.lamin`), read once
  when `lamindb` is first imported. `connect` and `init_instance` set it before that import,
  so a project keeps its instance out of the user's global settings, and a separate process
  (a Snakemake job) finds the instance from the same two values: the settings directory and
  the instance name (`lamin_environment` gives them as environment variables).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from cellfoundry.errors import CellfoundryError

SCHEME = "lamin://"
REGISTRIES = ("artifact", "collection")
# Where files from outside the storage root are hard-linked so they can be registered offline.
EXTERNAL_DIR = ".cellfoundry/lamin-external"
LOCK_FILE = ".lamindb/cellfoundry.lock"

_UID = re.compile(r"[A-Za-z0-9]{16}(?:[A-Za-z0-9]{4})?")


class LaminError(CellfoundryError):
    """A LaminDB reference, instance or registration that cannot be used."""


@dataclass(frozen=True)
class LaminReference:
    """A parsed `lamin://<registry>/<uid or key>` reference.

    Parameters
    ----------
    registry
        `artifact` or `collection`.
    identifier
        A uid (16 or 20 characters) or a key.
    """

    registry: Literal["artifact", "collection"]
    identifier: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.registry}/{self.identifier}"


@dataclass(frozen=True)
class Registration:
    """What `register_outputs` recorded: plain values, ready to write as a JSON receipt.

    Parameters
    ----------
    transform
        Uid of the transform (one per pipeline rule and version).
    run
        Uid of the run that made the outputs.
    outputs
        Uids of the output artifacts, in the order of the paths given.
    keys
        Keys of the output artifacts, in the same order.
    inputs
        Uids of the input artifacts and collections linked to the run.
    unregistered_inputs
        Inputs that could not be registered (outside the storage root on another file
        system); kept as paths in the run's params.
    reused
        True when an identical registration existed and nothing was written.
    """

    transform: str
    run: str
    outputs: tuple[str, ...]
    keys: tuple[str, ...]
    inputs: tuple[str, ...]
    unregistered_inputs: tuple[str, ...]
    reused: bool

    def to_dict(self) -> dict[str, Any]:
        """The registration as JSON-ready values."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# --- references -------------------------------------------------------------------------


def is_lamin_reference(value: object) -> bool:
    """Whether a dataset-sheet value is a `lamin://` reference rather than a file path."""
    return isinstance(value, str) and value.startswith(SCHEME)


def parse_reference(reference: str) -> LaminReference:
    """Split a `lamin://<registry>/<uid or key>` reference.

    Raises
    ------
    LaminError
        When the text is not a reference of a known registry with a non-empty identifier.
    """
    if not is_lamin_reference(reference):
        raise LaminError(f"'{reference}' is not a LaminDB reference (expected '{SCHEME}...')")
    registry, _, identifier = reference[len(SCHEME) :].partition("/")
    if registry not in REGISTRIES:
        raise LaminError(
            f"reference '{reference}': unknown registry '{registry}' "
            f"(expected {' or '.join(REGISTRIES)}, as in {SCHEME}artifact/<uid or key>)"
        )
    if not identifier or identifier.startswith("/") or identifier.endswith("/"):
        raise LaminError(f"reference '{reference}': no uid or key after '{registry}/'")
    return LaminReference(registry, identifier)  # type: ignore[arg-type]


# --- instance -----------------------------------------------------------------------------


def lamin_environment(instance: str, *, settings_dir: str | Path | None = None) -> dict[str, str]:
    """Environment variables that make a new process connect to `instance` when it imports lamindb.

    Parameters
    ----------
    instance
        Instance slug, `anonymous/<name>` for a local instance made offline.
    settings_dir
        Folder whose `.lamin/` holds the instance's settings; None keeps the user's `~/.lamin`.
    """
    env = {"LAMIN_CURRENT_INSTANCE": instance}
    if settings_dir is not None:
        env["LAMIN_SETTINGS_DIR"] = str(Path(settings_dir).resolve())
    return env


@contextlib.contextmanager
def instance_lock(storage: str | Path) -> Iterator[None]:
    """Hold the project instance's lock: one process at a time creates the instance at `storage`
    and writes to it.

    Registration jobs of one project run side by side (one per dataset and species); without
    the lock two of them may both find no instance and both create one, and the second fails
    ("storage location ... is already marked ... by another LaminDB instance"). A lock file
    (`filelock`, POSIX `fcntl` locks) in `storage` serializes them.
    """
    from filelock import FileLock

    storage = Path(storage)
    storage.mkdir(parents=True, exist_ok=True)
    with FileLock(storage / ".lamin-instance.lock"):
        yield


def init_instance(storage: str | Path, *, name: str, settings_dir: str | Path | None = None) -> str:
    """Create a local SQLite instance whose storage root is `storage`, or connect to it if it exists.

    Works offline (anonymous user). LaminDB writes a `.lamin/current_instance` marker into
    the working directory of the call; it is made to land in `storage`, not in the caller's
    working directory.

    Parameters
    ----------
    storage
        Local folder, normally the pipeline's project directory: files under it are
        registered in place.
    name
        Instance name; the slug is `anonymous/<name>`.
    settings_dir
        Folder whose `.lamin/` gets the instance's settings (see `connect`).

    Returns
    -------
    The instance slug.
    """
    storage = Path(storage).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    _point_settings_at(settings_dir)
    # an instance named in the environment but not made yet would fail the import
    pending = None if "lamindb" in sys.modules else os.environ.pop("LAMIN_CURRENT_INSTANCE", None)
    try:
        ln = _import_lamindb(None)
    finally:
        if pending is not None:
            os.environ["LAMIN_CURRENT_INSTANCE"] = pending
    try:
        with contextlib.chdir(storage):
            ln.setup.init(storage=str(storage), name=name)
    except Exception as error:
        raise LaminError(
            f"cannot create LaminDB instance '{name}' in {storage}: {error}"
        ) from error
    return ln.setup.settings.instance.slug


def connect(instance: str | None = None, *, settings_dir: str | Path | None = None) -> ModuleType:
    """Import lamindb connected to `instance` and return the module.

    Call it once per process before any other use of lamindb (the settings directory cannot
    change after lamindb is imported).

    Parameters
    ----------
    instance
        Instance slug or name; None uses what lamindb finds itself
        (`LAMIN_CURRENT_INSTANCE`, a `.lamin/current_instance` marker above the working
        directory, or the user's current instance).
    settings_dir
        Folder whose `.lamin/` holds the instance settings; None keeps `$LAMIN_SETTINGS_DIR`
        or `~/.lamin`.

    Raises
    ------
    LaminError
        When lamindb is missing, the instance is unknown, or none is configured.
    """
    _point_settings_at(settings_dir)
    ln = _import_lamindb(instance)
    if instance is not None and not _is_current(ln, instance):
        try:
            ln.connect(instance)
        except Exception as error:
            raise LaminError(_unknown_instance(instance, error)) from error
    return _configured(ln)


def _point_settings_at(settings_dir: str | Path | None) -> None:
    if settings_dir is None:
        return
    wanted = Path(settings_dir).resolve()
    if "lamindb_setup" in sys.modules:
        current = Path(sys.modules["lamindb_setup"].settings.settings_dir).resolve()
        if current != wanted / ".lamin":
            raise LaminError(
                f"lamindb was already imported with settings in {current}; "
                f"cannot switch to {wanted / '.lamin'} in the same process"
            )
        return
    wanted.mkdir(parents=True, exist_ok=True)
    os.environ["LAMIN_SETTINGS_DIR"] = str(wanted)


def _import_lamindb(instance: str | None) -> ModuleType:
    if instance is not None and "lamindb" not in sys.modules:
        # connect on import, without touching the user's current instance
        os.environ["LAMIN_CURRENT_INSTANCE"] = instance
    try:
        import lamindb as ln
    except ImportError as error:
        raise LaminError(
            f"lamindb is not installed ({error}): install it with pip install 'cellfoundry[lamin]'"
        ) from error
    except Exception as error:  # lamindb connects on import and raises when it cannot
        raise LaminError(
            _unknown_instance(instance or os.environ.get("LAMIN_CURRENT_INSTANCE", "?"), error)
        ) from error
    return ln


def _unknown_instance(instance: str, error: Exception) -> str:
    settings = os.environ.get("LAMIN_SETTINGS_DIR", "~")
    return (
        f"cannot connect to LaminDB instance '{instance}' (settings in {settings}/.lamin): {error}"
    )


def _is_current(ln: ModuleType, instance: str) -> bool:
    current = ln.setup.settings.instance
    return instance in (current.slug, current.name)


def _configured(ln: ModuleType) -> ModuleType:
    if ln.setup.settings.instance.slug == "none/none":
        raise LaminError(
            "no LaminDB instance is configured: set the instance in the config, or "
            "LAMIN_CURRENT_INSTANCE and LAMIN_SETTINGS_DIR in the environment"
        )
    return ln


def _lamindb() -> ModuleType:
    return _configured(_import_lamindb(None))


def storage_root() -> Path:
    """The local storage root of the connected instance; files under it register in place."""
    ln = _lamindb()
    storage = ln.setup.settings.storage
    if storage.type_is_cloud:
        raise LaminError(
            f"the storage root of instance '{ln.setup.settings.instance.slug}' is "
            f"{storage.root_as_str}: registering pipeline outputs in place needs a local one"
        )
    return Path(str(storage.root)).resolve()


# --- source side --------------------------------------------------------------------------


def resolve_source(reference: str) -> list[Path]:
    """Local paths of the files a `lamin://` reference names, in a fixed order.

    An artifact gives its one path (a file, or a folder for a folder artifact); a collection
    gives the paths of its artifacts in the collection's order. For local storage these are
    the registered files themselves; artifacts in cloud storage are downloaded to the cache.
    A file that no longer holds the artifact's content (overwritten since) is an error.

    Raises
    ------
    LaminError
        Naming the reference, when it is malformed, matches nothing, or its files are gone.
    """
    parsed = parse_reference(reference)
    ln = _lamindb()
    record = _get_record(ln, parsed)
    artifacts = [record] if parsed.registry == "artifact" else list(record.ordered_artifacts.all())
    if not artifacts:
        raise LaminError(f"reference '{reference}': collection holds no artifacts")
    paths = []
    for artifact in artifacts:
        try:
            path = Path(str(artifact.cache(is_run_input=False)))
        except Exception as error:
            raise LaminError(
                f"reference '{reference}': cannot read artifact {artifact.uid} "
                f"(key '{artifact.key}'): {error}"
            ) from error
        if not path.exists():
            raise LaminError(
                f"reference '{reference}': file {path} of artifact {artifact.uid} is gone"
            )
        if artifact.storage.type == "local" and not _unchanged(artifact, path):
            raise LaminError(
                f"reference '{reference}': {path} no longer holds artifact {artifact.uid} "
                f"(key '{artifact.key}'): the file was overwritten"
                + ("" if artifact.is_latest else " by a later version of the key")
            )
        paths.append(path)
    return paths


def _unchanged(artifact: Any, path: Path) -> bool:
    """Whether a file registered in place still holds the artifact's content.

    In-place registration keeps one file per key, so older versions point at the newest
    content. Sizes are compared always; the hash (up to 100 MB read per file) only for an
    older version or a file modified after it was registered.
    """
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    stats = [f.stat() for f in files]
    if artifact.size is not None and sum(s.st_size for s in stats) != artifact.size:
        return False
    modified = max((s.st_mtime for s in stats), default=0.0)
    if artifact.hash is None or (
        artifact.is_latest and modified <= artifact.created_at.timestamp()
    ):
        return True
    from lamindb_setup.core.hashing import hash_dir, hash_file

    return (hash_dir(path) if path.is_dir() else hash_file(path))[1] == artifact.hash


def _get_record(ln: ModuleType, reference: LaminReference) -> Any:
    registry = ln.Artifact if reference.registry == "artifact" else ln.Collection
    identifier = reference.identifier
    if _UID.fullmatch(identifier):
        if len(identifier) == 20:
            record = registry.filter(uid=identifier).first()
        else:
            record = (
                registry.filter(uid__startswith=identifier, is_latest=True)
                .order_by("-created_at")
                .first()
            )
        if record is not None:
            return record
    records = list(registry.filter(key=identifier, is_latest=True).order_by("uid"))
    if len(records) > 1:
        uids = ", ".join(r.uid for r in records)
        raise LaminError(
            f"reference '{reference}': key '{identifier}' names several {reference.registry}s "
            f"({uids}); use a uid"
        )
    if not records:
        raise LaminError(
            f"reference '{reference}': no {reference.registry} with uid or key "
            f"'{identifier}' in instance '{ln.setup.settings.instance.slug}'"
        )
    return records[0]


# --- registry side ------------------------------------------------------------------------


def register_outputs(
    paths: Sequence[str | Path],
    *,
    transform_key: str,
    transform_version: str,
    params: dict[str, Any] | None = None,
    inputs: Iterable[Any] = (),
    key_prefix: str | None = None,
    description: str | None = None,
    kind: Literal["dataset", "model"] | None = None,
) -> Registration:
    """Register pipeline outputs in place, with the rule that made them and its inputs.

    Makes (or finds) a transform `transform_key` at `transform_version`, a run of it with
    `params`, links the inputs to the run and the outputs to it. Needs no `ln.track()`.
    Registering the same files again with the same transform, params and inputs writes
    nothing; new content under a key becomes a new version of that key.

    Parameters
    ----------
    paths
        Files or folders (a folder becomes one artifact) under the storage root.
    transform_key
        One key per pipeline rule, e.g. `cellfoundry/preprocess`.
    transform_version
        The rule's format or algorithm version.
    params
        The rule's params, JSON-serialisable.
    inputs
        Paths, `lamin://` references, or lamindb artifacts and collections. A path outside
        the storage root is hard-linked under it; when that is impossible it is kept in the
        run's params under `unregistered_inputs`.
    key_prefix
        Keys become `<key_prefix>/<file name>`; by default the key is the path under the
        storage root, so the key says where the file is.
    description
        Description of the output artifacts.
    kind
        Artifact kind; `.h5ad` files are registered as AnnData datasets regardless.

    Raises
    ------
    LaminError
        When an output is missing or cannot be placed under the storage root, or the params
        are not JSON.
    """
    ln = _lamindb()
    root = storage_root()
    params = _plain_params(params or {}, transform_key)
    outputs = [Path(p).resolve() for p in paths]
    for path in outputs:
        if not path.exists():
            raise LaminError(f"transform '{transform_key}': output {path} does not exist")
    from django.db import transaction

    with _registry_lock(root), transaction.atomic():
        transform = _transform(ln, transform_key, transform_version)
        input_records, unregistered = _input_records(ln, inputs, root)
        if unregistered:
            params = {**params, "unregistered_inputs": unregistered}
        artifacts = []
        for path in outputs:
            placed = _under_root(path, root)
            if placed is None:
                raise LaminError(
                    f"transform '{transform_key}': output {path} is outside the storage root "
                    f"{root} and cannot be hard-linked into it"
                )
            key = f"{key_prefix.strip('/')}/{path.name}" if key_prefix else None
            artifacts.append(_artifact(ln, placed, key=key, description=description, kind=kind))
        run = _matching_run(artifacts, transform, params, input_records)
        reused = run is not None
        if run is None:
            run = ln.Run(transform, params=params, status="started").save()
            _link_inputs(run, input_records, artifacts)
            for artifact in artifacts:
                if artifact.run_id is None:
                    artifact.run = run
                    artifact.save()
                elif artifact.run_id != run.id:
                    artifact.recreating_runs.add(run)
            # what ln.finish() does; there is no public call without ln.track()
            run._status_code = 0
            run.finished_at = datetime.now(UTC)
            run.save()
    return Registration(
        transform=transform.uid,
        run=run.uid,
        outputs=tuple(a.uid for a in artifacts),
        keys=tuple(a.key for a in artifacts),
        inputs=tuple(r.uid for r in input_records),
        unregistered_inputs=tuple(unregistered),
        reused=reused,
    )


def _plain_params(params: dict[str, Any], transform_key: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(params, sort_keys=True))
    except (TypeError, ValueError) as error:
        raise LaminError(f"transform '{transform_key}': params are not JSON: {error}") from error


@contextlib.contextmanager
def _registry_lock(root: Path) -> Iterator[None]:
    """Serialise registrations of concurrent jobs: get-or-create is not atomic in SQLite."""
    import fcntl

    lock = root / LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _transform(ln: ModuleType, key: str, version: str) -> Any:
    found = ln.Transform.filter(key=key, version_tag=version).order_by("-created_at").first()
    if found is not None:
        return found
    # Without `revises`, lamindb returns the existing transform of the key whatever the version.
    latest = ln.Transform.filter(key=key, is_latest=True).order_by("-created_at").first()
    return ln.Transform(key=key, version=version, kind="pipeline", revises=latest).save()


def _input_records(
    ln: ModuleType, inputs: Iterable[Any], root: Path
) -> tuple[list[Any], list[str]]:
    records: list[Any] = []
    unregistered: list[str] = []
    for item in inputs:
        if isinstance(item, (ln.Artifact, ln.Collection)):
            records.append(item)
        elif is_lamin_reference(item):
            records.append(_get_record(ln, parse_reference(item)))
        else:
            path = Path(item).resolve()
            if not path.exists():
                raise LaminError(f"input {path} does not exist")
            placed = _under_root(path, root)
            if placed is None:
                unregistered.append(str(path))
            else:
                records.append(_artifact_at(ln, placed))
    unique = {(type(r).__name__, r.id): r for r in records}
    return sorted(unique.values(), key=lambda r: (type(r).__name__, r.uid)), sorted(unregistered)


def _under_root(path: Path, root: Path) -> Path | None:
    """`path` itself when under `root`, else a hard link to it under `root` (None if impossible)."""
    if path.is_relative_to(root):
        return path
    if path.is_dir():
        return None
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    link = root / EXTERNAL_DIR / digest / path.name
    if link.exists() and os.path.samefile(link, path):
        return link
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # another file system, or links not allowed
        return None
    os.replace(tmp, link)
    return link


def _artifact(
    ln: ModuleType, path: Path, *, key: str | None, description: str | None, kind: str | None
) -> Any:
    """Save an artifact for `path` in place; lamindb returns the existing one for the same hash and key."""
    if path.suffix == ".h5ad":
        artifact = ln.Artifact.from_anndata(path, key=key, description=description, run=False)
    else:
        artifact = ln.Artifact(path, key=key, description=description, kind=kind, run=False)
    return artifact.save()


def _artifact_at(ln: ModuleType, path: Path) -> Any:
    """The artifact registered at `path` with its current content, registered now if none is.

    Found by content hash and location, whatever its key: an output registered under a
    `key_prefix` is still found when a later rule names it by path.
    """
    from lamindb_setup.core.hashing import hash_dir, hash_file  # the hashes lamindb stores

    content_hash = hash_dir(path)[1] if path.is_dir() else hash_file(path)[1]
    for existing in ln.Artifact.filter(hash=content_hash).order_by("-created_at"):
        if Path(str(existing.path)).resolve() == path:
            return existing
    return _artifact(ln, path, key=None, description=None, kind=None)


def _matching_run(artifacts: list[Any], transform: Any, params: dict, inputs: list[Any]) -> Any:
    run_ids = {a.run_id for a in artifacts}
    if len(run_ids) != 1 or None in run_ids:
        return None
    run = artifacts[0].run
    if run.transform_id != transform.id or (run.params or {}) != params:
        return None
    linked = {("Artifact", i) for i in run.input_artifacts.values_list("id", flat=True)}
    linked |= {("Collection", i) for i in run.input_collections.values_list("id", flat=True)}
    return run if linked == {(type(r).__name__, r.id) for r in inputs} else None


def _link_inputs(run: Any, inputs: list[Any], outputs: list[Any]) -> None:
    produced = {a.id for a in outputs}
    artifacts = [r for r in inputs if type(r).__name__ == "Artifact" and r.id not in produced]
    collections = [r for r in inputs if type(r).__name__ == "Collection"]
    if artifacts:
        run.input_artifacts.add(*artifacts)
    if collections:
        run.input_collections.add(*collections)


# --- query --------------------------------------------------------------------------------


def lineage_of(artifact: Any) -> list[Any]:
    """All artifacts an artifact was made from, transitively, nearest first.

    Follows the run that created each artifact to its input artifacts and the artifacts of
    its input collections. Within one step back the order is by key, then uid.

    Parameters
    ----------
    artifact
        A lamindb artifact or a `lamin://artifact/...` reference.
    """
    ln = _lamindb()
    if isinstance(artifact, str):
        reference = parse_reference(artifact)
        if reference.registry != "artifact":
            raise LaminError(f"lineage_of needs an artifact reference, not '{artifact}'")
        artifact = _get_record(ln, reference)
    seen = {artifact.id}
    lineage: list[Any] = []
    frontier = [artifact]
    while frontier:
        step: dict[int, Any] = {}
        for record in frontier:
            if record.run_id is None:
                continue
            run = record.run
            for parent in run.input_artifacts.all():
                step[parent.id] = parent
            for collection in run.input_collections.all():
                for parent in collection.ordered_artifacts.all():
                    step[parent.id] = parent
        frontier = sorted(
            (a for i, a in step.items() if i not in seen), key=lambda a: (a.key or "", a.uid)
        )
        seen.update(a.id for a in frontier)
        lineage.extend(frontier)
    return lineage
