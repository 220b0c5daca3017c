"""One exception type for every user-facing error: the CLI prints its message on one line and exits 2."""


class NocloneError(Exception):
    """A bad input or an impossible request, explained in one line."""
