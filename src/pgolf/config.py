"""Config loading: YAML + JSON-schema validation with defaults, and per-component dataclasses."""

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"
T = TypeVar("T")
# jsonschema and yaml are imported where used: the exported train_gpt.py ships this module
# without them.


def section(cls: type[T], values: dict[str, Any] | None, name: str | None = None) -> T:
    """Build the dataclass `cls` from one config section, rejecting keys it does not know."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = name or cls.__name__
        raise ValueError(f"config section {where}: unknown keys {unknown}; known: {sorted(known)}")
    return cls(**values)


def validate_config(config: dict, *, schema: str | Path = SCHEMA,
                    files: Sequence[str | Path] = ()) -> dict:
    """Fill the schema's defaults into `config` (in place) and validate it.

    A violation raises one ValueError naming the config files, the key and the bad value.
    """
    import jsonschema
    import yaml

    with open(schema) as f:
        spec = yaml.safe_load(f)
    fill_defaults(config, spec)
    errors = jsonschema.Draft202012Validator(spec).iter_errors(config)
    error = jsonschema.exceptions.best_match(errors)
    if error is not None:
        key = ".".join(map(str, error.absolute_path)) or "(top level)"
        where = ", ".join(map(str, files)) or "config"
        value = "" if isinstance(error.instance, dict | list) else f" = {error.instance!r}"
        raise ValueError(f"{where}: {key}{value}: {error.message}")
    return config


def fill_defaults(config: dict, spec: dict) -> None:
    for key, prop in spec.get("properties", {}).items():
        if key not in config and "default" in prop:
            config[key] = _copy(prop["default"])
        if isinstance(config.get(key), dict) and prop.get("type") == "object":
            fill_defaults(config[key], prop)


def _copy(value):
    # Defaults such as {} or [1, 2] must not be shared between configs.
    return copy.deepcopy(value)


def load_config(*paths: str | Path, schema: str | Path = SCHEMA) -> dict:
    """Merge YAML files (later wins, nested), then validate and fill schema defaults."""
    import yaml

    config: dict = {}
    for path in paths:
        with open(path) as f:
            merge(config, yaml.safe_load(f) or {})
    return validate_config(config, schema=schema, files=paths)


def merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base
