"""`noclone bench`: defence x attack x transform benchmarks, every stage cached, resumable, with a report."""

from noclone.bench.config import BenchConfig, load_config, validate
from noclone.bench.runner import cells, render_report, run_bench

__all__ = ["BenchConfig", "cells", "load_config", "render_report", "run_bench", "validate"]
