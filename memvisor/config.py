"""The TOML config file: where it is, and reading it into a policy layer (same names as the JSON policy)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from memvisor import paths, policy
from memvisor.errors import ConfigError


def load(path: Path | None, *, explicit: bool) -> tuple[str, dict[str, object]]:
    """Read the config file into a named policy layer.

    `explicit` means the user named the file (--config): then a missing file is an error. The default file
    (paths.default_config()) is optional.
    """
    path = path or paths.default_config()
    if not path.exists():
        if explicit:
            raise ConfigError(f"config file {path} does not exist", hint="check the --config path")
        return (f"config {path}", {})
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return (f"config {path}", policy.layer_from_mapping(doc, str(path), image_spec=True))
