"""The config and the dataset sheet: validation against JSON schemas, per-dataset settings.

`workflow/rules/common.smk` calls these before any job runs, so a bad value fails the whole
run at once with a message that names the file and the key (or the sheet's row).
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml

from cellfoundry.errors import ConfigError

# A dataset name becomes a folder and a Snakemake wildcard: keep it to a safe alphabet.
DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
SPECIES_NAME = re.compile(r"^[a-z][a-z0-9_]{1,63}$")
# Sheet columns that override the config's `preprocess` section for one dataset.
PREPROCESS_OVERRIDES = {
    "counts": str,
    "genes": str,
    "min_genes": int,
    "min_counts": int,
    "max_genes": int,
    "max_counts": int,
    "max_mito_fraction": float,
    "min_mapping_rate": float,
    "duplicate_genes": str,
}


def schema_path(name: str) -> Path:
    """A schema shipped with the package (`config` or `datasets`); `workflow/schemas` links here."""
    return Path(__file__).parent / "schemas" / f"{name}.schema.yaml"


def load_schema(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


@functools.cache
def _config_schema() -> dict[str, Any]:
    return load_schema(schema_path("config"))


def schema_default(key: str) -> Any:
    """The default of a config key (dotted: `train.model.d_model`) as the schema states it.

    The schema is the one place defaults live: dataclasses that mirror config keys take their
    defaults from here, and `tests/test_config_defaults.py` checks that none drifts.
    """
    node = _config_schema()
    for part in key.split("."):
        node = node["properties"][part]
    return copy.deepcopy(node["default"])


def _extend_with_default(validator_class: type) -> type:
    """A validator that fills in the schema's defaults (the jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(
        validator: Any, properties: dict, instance: Any, schema: dict
    ) -> Iterator[Any]:
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _extend_with_default(jsonschema.Draft202012Validator)


def validate(instance: Any, schema: dict[str, Any], *, source: str, validator: Any = None) -> Any:
    """Validate (and fill defaults into) `instance`; errors name `source` and the key path.

    `validator`: `_Validator(schema)`, made once by a caller that validates many instances
    against one schema (the sheet's rows).
    """
    instance = copy.deepcopy(instance)
    validator = validator or _Validator(schema)
    _parse_command_line_nulls(instance, schema)
    errors = list(validator.iter_errors(instance))
    # Only an invalid instance can hold command-line text to read as numbers: fix, recheck.
    if errors and _parse_command_line_strings(instance, schema):
        errors = list(validator.iter_errors(instance))
    errors = sorted(errors, key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {key}: {error.message}{more}")
    return instance


def _parse_command_line_strings(instance: Any, schema: dict[str, Any]) -> bool:
    """Read numbers, booleans and nulls that arrive as strings (`snakemake --config
    'train={max_steps: 50}'` passes nested values as text) the way YAML would; whether any
    was read."""
    checker = jsonschema.Draft202012Validator(schema)  # reports only: fills no defaults
    changed = False
    for _ in range(100):  # each pass fixes every string it can; nested fixes need a few passes
        fixed = False
        for error in checker.iter_errors(instance):
            if (
                error.validator != "type"
                or not isinstance(error.instance, str)
                or not error.absolute_path
            ):
                continue
            value = yaml.safe_load(error.instance)
            if isinstance(value, str):
                continue
            parent = instance
            *path, last = error.absolute_path
            for key in path:
                parent = parent[key]
            parent[last] = value
            fixed = changed = True
        if not fixed:
            return changed
    return changed


def _parse_command_line_nulls(instance: Any, schema: dict[str, Any]) -> None:
    """`null` given on the command line (`snakemake --config 'train={gene_embeddings: null}'`
    arrives as the text 'null') is YAML's null wherever the schema allows null."""
    if not isinstance(instance, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if name not in instance:
            continue
        value = instance[name]
        if isinstance(value, dict):
            _parse_command_line_nulls(value, sub)
        elif isinstance(value, str) and _allows_null(sub) and yaml.safe_load(value or "x") is None:
            instance[name] = None


def _allows_null(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return (
        kind == "null"
        or (isinstance(kind, list) and "null" in kind)
        or None in schema.get("enum", [object()])
    )


def validate_config(
    config: dict[str, Any], schema: str | Path | None = None, *, source: str = "config"
) -> dict[str, Any]:
    """The config with the training preset and the defaults filled in; errors name the key.

    Precedence: the schema's defaults < the preset (`train.preset`) < what the config and the
    command line set.
    """
    schema = load_schema(schema or schema_path("config"))
    config = _from_command_line(dict(config or {}), schema)
    if "train" in config:
        config["train"] = _with_preset(config["train"], source)
    config = validate(config, schema, source=source)
    _check_train(config["train"], source)
    return config


def _from_command_line(values: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Values as typed values: command-line text read the way YAML would, before any merge."""
    values = copy.deepcopy(values)
    _parse_command_line_nulls(values, schema)
    _parse_command_line_strings(values, schema)
    return values


def _with_preset(train: dict[str, Any], source: str) -> dict[str, Any]:
    from cellfoundry.train.presets import apply_preset

    try:
        return apply_preset(train)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from error


def _check_train(train: dict[str, Any], source: str) -> None:
    from cellfoundry.train.presets import check_train_settings

    try:
        check_train_settings(train)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from error


def section_defaults(
    section: str, values: dict[str, Any] | None = None, *, source: str = "settings"
) -> dict[str, Any]:
    """One top-level section of the config (e.g. `train`), validated, with its defaults."""
    schema = _config_schema()
    sub = {**schema["properties"][section], "$defs": schema.get("$defs", {})}
    values = _from_command_line(values or {}, sub)
    if section == "train":
        values = _with_preset(values, source)
    filled = validate(values, sub, source=f"{source} ({section})")
    if section == "train":
        _check_train(filled, f"{source} ({section})")
    return filled


def read_dataset_sheet(path: str | Path, schema: str | Path | None = None) -> pd.DataFrame:
    """Read and validate the dataset sheet (TSV), one row per dataset, indexed by name.

    Empty cells mean "use the config's value". Raises ConfigError naming the row and column.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset sheet {path} does not exist")
    sheet = pd.read_csv(
        path, sep="\t", dtype=str, comment="#", skip_blank_lines=True, keep_default_na=False
    )
    sheet.columns = [c.strip() for c in sheet.columns]
    schema = load_schema(schema or schema_path("datasets"))
    validator = _Validator(schema)
    rows = []
    for number, record in enumerate(sheet.to_dict(orient="records"), start=2):
        row = {k: v.strip() for k, v in record.items() if isinstance(v, str) and v.strip() != ""}
        for column, kind in PREPROCESS_OVERRIDES.items():
            if column in row and kind is not str:
                try:
                    value = float(row[column])
                except ValueError as error:
                    raise ConfigError(
                        f"{path}, line {number}: {column}: '{row[column]}' is not a number"
                    ) from error
                # Spreadsheets write 150 as 150.0; the schema rejects 150.5 for an integer column.
                row[column] = int(value) if kind is int and value.is_integer() else value
        name = row.get("dataset", "")
        if name and not DATASET_NAME.match(name):
            raise ConfigError(
                f"{path}, line {number}: dataset name '{name}' is not a safe identifier "
                "(letters, digits, '_' and '-', starting with a letter or digit, at most 128 characters)"
            )
        rows.append(
            validate(
                row,
                schema,
                source=f"{path}, line {number}" + (f" (dataset '{name}')" if name else ""),
                validator=validator,
            )
        )
    if not rows:
        raise ConfigError(f"dataset sheet {path} lists no dataset")
    frame = pd.DataFrame(rows)
    duplicated = frame["dataset"][frame["dataset"].duplicated()].tolist()
    if duplicated:
        raise ConfigError(
            f"{path}: dataset name(s) listed twice: {', '.join(sorted(set(duplicated)))}"
        )
    return frame.set_index("dataset", drop=False)


def dataset_settings(config: dict[str, Any], row: dict[str, Any] | pd.Series) -> dict[str, Any]:
    """The preprocessing settings of one dataset: the config's, overridden by the sheet's row."""
    settings = dict(config["preprocess"])
    for column in PREPROCESS_OVERRIDES:
        value = row.get(column) if hasattr(row, "get") else None
        if value is not None and not (isinstance(value, float) and pd.isna(value)):
            settings[column] = value
    return settings
