"""fxslice's built-in passes, written only against fxslice's public API."""

from passes.cleanup import CleanupIR

__all__ = ["CleanupIR"]
