"""Third-party noise off in every process that runs noclone's work: the command line, the demo's workers, Ray tasks."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_third_party() -> None:
    """Hugging Face progress bars and chatter off, offline hub; our own bars and logs stay."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # torchvision is absent on purpose (its PyPI build breaks beside our torch); transformers warns about it
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    for noisy in ("diffusers", "transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    for module, name in (("huggingface_hub.utils", "disable_progress_bars"),
                         ("diffusers.utils.logging", "disable_progress_bar"),  # "Loading pipeline components"
                         ("transformers.utils.logging", "disable_progress_bar")):
        try:
            getattr(__import__(module, fromlist=[name]), name)()
        except (ImportError, AttributeError):  # cosmetic only
            pass
