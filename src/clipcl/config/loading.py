"""Building configs from YAML files and dotted overrides, strictly: unknown keys are rejected."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from clipcl.config.schema import ConfigError, RunConfig

# --- building dataclasses from plain dicts, strictly -------------------------------------------


def _field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type; raise ConfigError on a mismatch."""
    text = str(annotation)
    if value is None:
        if "None" in text or annotation is Any:
            return None
        raise ConfigError(f"{key}: null is not allowed here")
    if annotation is bool or text == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int or text.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float or text.startswith("float"):
        if isinstance(value, str):
            # PyYAML reads "1e-4" (no dot) as a string; accept any text Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str or text.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if text.startswith("list"):
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return list(value)
    return value


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with the valid ones listed."""
    data = dict(data or {})
    hints = get_type_hints(cls)
    valid = _field_names(cls)
    unknown = sorted(set(data) - set(valid))
    if unknown:
        where = f"{prefix}{unknown[0]}"
        raise ConfigError(f"unknown key {where!r}; valid keys here: {', '.join(prefix + v for v in valid)}")
    kwargs = {}
    for name in valid:
        if name not in data:
            continue
        annotation = hints[name]
        value = data[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping")
            kwargs[name] = from_dict(annotation, value, prefix=f"{prefix}{name}.")
        elif name == "strategy" and cls is RunConfig:
            if not isinstance(value, dict):
                raise ConfigError("strategy: expected a mapping with at least `name`")
            kwargs[name] = dict(value)
        else:
            kwargs[name] = _coerce(value, annotation, f"{prefix}{name}")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-ready dict of a dataclass tree."""
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 1e-4). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys inside a nested dict (validation happens afterwards, in from_dict)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def shipped_configs() -> dict[str, Path]:
    """The run configs that ship inside clipcl (``clipcl/configs/*.yaml``), by name without ``.yaml``."""
    from importlib import resources

    folder = Path(str(resources.files("clipcl") / "configs"))
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults), apply overrides, validate everything.

    ``path`` may also be the name of a shipped config (``vr_lwf``, ``zscl``...; see :func:`shipped_configs`).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists() and path.suffix == "" and path.name in shipped_configs():
            path = shipped_configs()[path.name]
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist (shipped configs: {', '.join(shipped_configs())})")
        if path.is_dir():
            raise ConfigError(f"config {path} is a folder; give a YAML file inside it")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start})") from None
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        data = loaded or {}
    data = apply_overrides(data, list(overrides or []))
    # RunConfig validates every section, the strategy's included, so a typo or a value out of range
    # fails here, before any data or model loads.
    return from_dict(RunConfig, data)


def config_fingerprint(config: RunConfig) -> str:
    """What must match for a run to be resumed: everything that changes a number. Left out: where
    outputs go, the label, the observers (they only read events) and the evaluation settings that
    change only how features are computed or stored (``eval.batch_size``: predictions are per image,
    though another size may change a feature's last bits and so a prediction on a near-tie;
    ``eval.feature_cache``, ``eval.cache_dir``: a cached feature is the one computed). The rest of
    ``eval`` stays in: a resume with other retrieval sets or another zero-shot setting would mix rows
    measured two ways. The data itself is checked separately (progress.json's ``data``)."""
    data = to_dict(config)
    data.pop("output_dir", None)
    data.pop("name", None)
    data.pop("observe", None)
    if config.stream.protocol != "time":  # read by time streams only: other runs' fingerprints stay as they were
        data.pop("time", None)
    for key in ("batch_size", "feature_cache", "cache_dir"):
        data["eval"].pop(key, None)
    # Added after the first runs: at torch's defaults they change nothing, so those runs stay resumable.
    for key, default in (("adam_betas", [0.9, 0.999]), ("adam_eps", 1e-8)):
        if data["train"].get(key) == default:
            data["train"].pop(key)
    return json.dumps(data, sort_keys=True)
