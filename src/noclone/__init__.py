"""noclone: stop diffusion models from being personalized into copies of a subject, and measure how well it holds."""

__version__ = "0.1.0"

from noclone.errors import NocloneError

__all__ = ["NocloneError", "__version__"]
