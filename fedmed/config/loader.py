"""Load TOML configs into typed models, with messages that name the file, the key and the fix."""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import tomli_w
from pydantic import BaseModel, ValidationError

from fedmed.core.errors import ConfigError

from .run import RunConfig
from .synth import SynthConfig

ModelT = TypeVar("ModelT", bound=BaseModel)


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file raises ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; check the path (relative paths start at {Path.cwd()})")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error}); fix the syntax at that line") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file; save it as UTF-8 TOML") from error


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides; values are parsed as TOML (strings may be bare)."""
    for override in overrides:
        dotted, separator, text = override.partition("=")
        if not separator or not dotted.strip():
            raise ConfigError(f"override '{override}': write it as section.key=value, e.g. train.rounds=3")
        try:
            value = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        node = raw
        keys = dotted.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{override}': '{key}' is not a section")
        node[keys[-1]] = value
    return raw


def validate(model: type[ModelT], raw: dict[str, Any], *, source: str) -> ModelT:
    """Validate raw data against a model; all problems are reported together."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        lines = [_describe(model, item) for item in error.errors()]
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(f"  - {line}" for line in lines)) from None


def load_run_config(path: Path, *, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config; relative data and output paths are taken relative to the config file."""
    path = Path(path)
    raw = apply_overrides(read_toml(path), overrides or [])
    config = validate(RunConfig, raw, source=str(path))
    return resolve_paths(config, base=path.resolve().parent)


def run_config_from_dict(raw: dict[str, Any], *, base: Path, source: str = "run config") -> RunConfig:
    return resolve_paths(validate(RunConfig, raw, source=source), base=base)


def load_synth_config(path: Path) -> SynthConfig:
    raw = read_toml(Path(path))
    return validate(SynthConfig, raw.get("synth", raw), source=str(path))


def resolve_paths(config: RunConfig, *, base: Path) -> RunConfig:
    if not config.output_dir.is_absolute():
        config.output_dir = base / config.output_dir
    for site in config.sites:
        if not site.path.is_absolute():
            site.path = base / site.path
    if config.model.init is not None and not config.model.init.is_absolute():
        config.model.init = base / config.model.init
    if config.pretrain.public is not None and not config.pretrain.public.is_absolute():
        config.pretrain.public = base / config.pretrain.public
    return config


def dump_toml(model: BaseModel) -> str:
    """The resolved config as TOML (None values dropped: TOML has no null)."""
    return tomli_w.dumps(model.model_dump(mode="json", exclude_none=True))


def _describe(model: type[BaseModel], item: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in item["loc"]) or "(top level)"
    if item["type"] == "extra_forbidden":
        suggestion = _closest_field(model, item["loc"])
        hint = f"; did you mean '{suggestion}'?" if suggestion else ""
        return f"unknown key '{location}'{hint} Remove or rename it."
    if item["type"] == "missing":
        return f"'{location}' is required; add it"
    message = item["msg"].removeprefix("Value error, ")
    if location == "(top level)" or item["type"] == "value_error":
        return f"{location}: {message}" if location != "(top level)" else message
    return f"'{location}': {message} (got {item.get('input')!r})"


def _closest_field(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """Walk the model along loc[:-1] and find the field name closest to loc[-1]."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        current = _model_in(field.annotation)
        if current is None:
            return None
    names = list(getattr(current, "model_fields", {}))
    matches = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.5)
    if not matches:
        return None
    return ".".join([str(part) for part in loc[:-1]] + [matches[0]])


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _model_in(argument)
        if found is not None:
            return found
    return None
