"""YAML configuration text to data, with one-line errors naming file, line and column."""
from __future__ import annotations

from typing import Any, Union

import yaml

from .errors import ConfigError


def parse_yaml(text: Union[str, bytes], source: str) -> Any:
    """``yaml.safe_load`` whose syntax errors become a :class:`ConfigError`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
