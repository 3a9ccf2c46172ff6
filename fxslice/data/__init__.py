"""Text for calibration and evaluation (WikiText-2 ships with the package)."""

from fxslice.data.text import WIKITEXT2, load_text, token_windows

__all__ = ["WIKITEXT2", "load_text", "token_windows"]
