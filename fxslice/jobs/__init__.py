"""Whole jobs above the layers: capture, run a recipe, evaluate, save, in one call (`compress`)."""

from fxslice.jobs.compress import Report, capture_with_cache, compress

__all__ = ["Report", "capture_with_cache", "compress"]
