"""Load the configuration: built-in defaults ← TOML file ← ``KSHIPRA_*`` environment.

Environment variables address any scalar key with ``__`` between levels, e.g.
``KSHIPRA_ORIGIN__LISTEN=127.0.0.1:9000`` or ``KSHIPRA_ORIGIN__UPLOAD_LIMITS__IMAGE_BYTES=16MiB``.
Secrets come only from ``KSHIPRA_UPLOAD_TOKEN``, ``KSHIPRA_PURGE_TOKEN`` and
``KSHIPRA_SIGNING_KEY``; a ``[secrets]`` table in a file is refused so tokens never end up in a
repository.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cdn_config.model import KshipraConfig

ENV_PREFIX = "KSHIPRA_"
SECRET_VARIABLES = {
    "KSHIPRA_UPLOAD_TOKEN": "upload_token",
    "KSHIPRA_PURGE_TOKEN": "purge_token",
    "KSHIPRA_SIGNING_KEY": "signing_key",
}
TOP_LEVEL_VARIABLES = {"KSHIPRA_LOG_LEVEL": "log_level"}
"""Top-level keys settable from the environment (other ``KSHIPRA_X`` names are the CLI's own,
such as ``KSHIPRA_ORIGIN_URL``)."""
SAMPLE_CONFIG = Path(__file__).with_name("sample.toml")


class ConfigError(Exception):
    """A configuration value is missing or wrong; the message names the key and the reason."""


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for item in error.errors():
        location = ""
        for part in item["loc"]:
            location += f"[{part}]" if isinstance(part, int) else f".{part}" if location else part
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {location or '(top level)'}: {message}")
    return "\n".join(lines)


def _overlay_environment(data: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """Apply ``KSHIPRA_A__B=value`` onto *data*; return the variable names used."""
    used = []
    for name, value in sorted(environ.items()):
        if name in TOP_LEVEL_VARIABLES:
            data[TOP_LEVEL_VARIABLES[name]] = value
            used.append(name)
            continue
        if not name.startswith(ENV_PREFIX) or name in SECRET_VARIABLES or "__" not in name:
            continue
        if name.startswith(f"{ENV_PREFIX}EDGES__"):
            raise ConfigError(f"{name}: edges are configured in the TOML file, not the environment")
        path = [part.lower() for part in name.removeprefix(ENV_PREFIX).split("__")]
        if not all(path):
            raise ConfigError(f"{name}: empty key segment")
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path)} is not a table")
            node = child
        node[path[-1]] = value
        used.append(name)
    return used


def _merge(target: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Deep-merge *overrides* into *target*; ``None`` values mean "not given"."""
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            child = target.get(key)
            if not isinstance(child, dict):
                child = target[key] = {}
            _merge(child, value)
        elif value is not None:
            target[key] = value


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str],
    overrides: Mapping[str, Any] | None = None,
) -> KshipraConfig:
    """Build the configuration or raise :class:`ConfigError` naming the bad key.

    *overrides* are command-line values (``{"origin": {"listen": "…"}}``), applied last.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        if "secrets" in data:
            raise ConfigError(
                f"{path}: secrets: tokens and keys are read from the environment only "
                f"({', '.join(SECRET_VARIABLES)}); remove the [secrets] table"
            )
        source = str(path)
    used = _overlay_environment(data, environ)
    if used:
        source += " + " + ", ".join(used)
    secrets = {
        field: environ[variable]
        for variable, field in SECRET_VARIABLES.items()
        if environ.get(variable)
    }
    data["secrets"] = secrets
    _merge(data, overrides or {})
    try:
        return KshipraConfig.model_validate(data)
    except ValidationError as exc:
        message = _format_validation_error(exc, source)
        for variable, field in SECRET_VARIABLES.items():
            message = message.replace(f"secrets.{field}", variable)
        raise ConfigError(message) from None
