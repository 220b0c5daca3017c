"""Identity id ranges of the sandbox world: who the generator, the evaluator and the tests may see."""

import re

from noclone.errors import NocloneError

GENERATOR_IDENTITIES = range(0, 1_000_000)
EVALUATOR_IDENTITIES = range(1_000_000, 2_000_000)
HELD_OUT_IDENTITIES = range(2_000_000, 3_000_000)


def held_out(index: int) -> int:
    """The index-th held-out identity id (never seen by the generator or the evaluator)."""
    return HELD_OUT_IDENTITIES.start + index


def parse_identity(value, label: str) -> tuple[int, str]:
    """A sandbox identity as written in a config: an id (int >= 0) or 'held_out:N'. Returns (id, short name)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, str(value)
    m = re.fullmatch(r"held_out:(\d+)", str(value).strip())
    if m:
        return held_out(int(m.group(1))), f"h{m.group(1)}"
    raise NocloneError(f"{label}.identity: expected an identity id or 'held_out:N', got {value!r}")
