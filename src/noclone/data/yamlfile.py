"""YAML text to data, with the one-line error every config reader gives (recipes, bench configs, batteries)."""

from __future__ import annotations

from typing import Any

from noclone.errors import NocloneError


def load_yaml(text: str, where: str) -> Any:
    """`yaml.safe_load(text)`, or a NocloneError naming `where` and the line the parser stopped at."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        raise NocloneError(f"{where}: not valid YAML{at}" + (f" ({problem})" if problem else "")) from None
