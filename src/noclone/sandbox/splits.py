"""Identity id ranges of the sandbox world: who the generator, the evaluator and the tests may see."""

GENERATOR_IDENTITIES = range(0, 1_000_000)
EVALUATOR_IDENTITIES = range(1_000_000, 2_000_000)
HELD_OUT_IDENTITIES = range(2_000_000, 3_000_000)


def held_out(index: int) -> int:
    """The index-th held-out identity id (never seen by the generator or the evaluator)."""
    return HELD_OUT_IDENTITIES.start + index
