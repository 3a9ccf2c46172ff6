"""A GGUF file converted once to a transformers directory, so that later loads skip the GGUF parse.

transformers reads a GGUF file three times (config, tokenizer, weights), and its pure-Python reader spends most of
that on the vocabulary: about 35 s of a 40 s load for the embedded SmolLM2 on 2 cores, against about 2 s for the
same model from safetensors. The first float32 load converts the file; later loads, in any dtype, read the copy.
The copy is keyed by the file's path, size and modification time and by the transformers version, and written
to a temporary folder that is renamed into place only when complete, so a crash leaves nothing half-written and
concurrent processes (pytest-xdist workers) do not clash. `FXSLICE_CACHE=off` turns it off; `FXSLICE_CACHE=DIR`
moves it (default: `$XDG_CACHE_HOME/fxslice`, else `~/.cache/fxslice`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["cache_root", "converted_copy", "store_converted"]

_COMPLETE = "fxslice-converted-from.txt"


def cache_root() -> Path | None:
    """Where converted copies live, or None when the user turned the cache off."""
    setting = os.environ.get("FXSLICE_CACHE", "")
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    if setting:
        return Path(setting)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fxslice"


def _slot(gguf: Path) -> Path | None:
    import transformers

    root = cache_root()
    if root is None:
        return None
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return root / "gguf" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def converted_copy(gguf: Path) -> Path | None:
    """The complete converted copy of `gguf`, or None when there is none (yet)."""
    slot = _slot(gguf)
    return slot if slot is not None and (slot / _COMPLETE).is_file() else None


def store_converted(gguf: Path, model: nn.Module, tokenizer: Any) -> Path | None:
    """Save a float32 model (and tokenizer) loaded from `gguf` as its converted copy; None if it cannot be written.

    A failure to write (read-only home, full disk) only costs the speed-up: it is a warning, never an error."""
    slot = _slot(gguf)
    if slot is None:
        return None
    scratch: Path | None = None
    try:
        slot.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=slot.parent))
        _save_dequantized(model, scratch)
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
        (scratch / _COMPLETE).write_text(f"{gguf.resolve()}\n", encoding="utf-8")
        try:
            scratch.rename(slot)
        except OSError:  # another process finished first: its copy is as good as ours
            if not (slot / _COMPLETE).is_file():
                raise
        return slot
    except Exception as exc:  # noqa: BLE001 - any failure to write only costs the speed-up
        warnings.warn(f"could not cache the converted GGUF in {slot.parent} ({exc}); the next load parses the GGUF "
                      "again. Set FXSLICE_CACHE=DIR to a writable folder, or FXSLICE_CACHE=off", stacklevel=2)
        return None
    finally:
        if scratch is not None and scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def _save_dequantized(model: nn.Module, folder: Path) -> None:
    """Save a model transformers loaded from GGUF as the plain model it is.

    transformers dequantizes GGUF weights while loading but keeps its GGUF quantizer on the model, and refuses to
    save a model with that quantizer; the weights are ordinary tensors, so the quantizer is set aside for the save.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = model.config
    had_config = hasattr(config, "quantization_config")
    quant_config = getattr(config, "quantization_config", None)
    flags = {name: getattr(model, name) for name in ("is_quantized", "quantization_method") if hasattr(model, name)}
    try:
        model.hf_quantizer = None
        if had_config:
            del config.quantization_config
        for name in flags:
            setattr(model, name, False if name == "is_quantized" else None)
        model.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if had_config:
            config.quantization_config = quant_config
        for name, value in flags.items():
            setattr(model, name, value)
