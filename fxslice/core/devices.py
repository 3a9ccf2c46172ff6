"""Turn the user's `--device` and `--dtype` into torch objects, or one clear error before any work."""

from __future__ import annotations

import torch

from fxslice.core.errors import InvalidOption

__all__ = ["resolve_device", "resolve_dtype", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """`auto` takes the first GPU when there is one (CUDA, then Apple's MPS), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps") if mps is not None and mps.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InvalidOption(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidOption(f"--device {name}: no CUDA device is visible to PyTorch (torch.cuda.is_available() is "
                                "False; a CPU-only torch build, or CUDA_VISIBLE_DEVICES hides them): use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InvalidOption(f"--device {name}: there are {count} CUDA device(s), numbered 0 to {count - 1}")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InvalidOption(f"--device {name}: MPS is not available on this machine: use --device cpu")
    elif device.type != "cpu":
        raise InvalidOption(f"--device {name}: fxslice runs on cpu, cuda and mps")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype; refused where the device cannot compute in it."""
    if name not in DTYPES:
        raise InvalidOption(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise InvalidOption(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic; use "
                            "--dtype float16 or float32")
    if device.type == "mps" and dtype == torch.float64:
        raise InvalidOption("--dtype float64: MPS has no float64; use float32")
    return dtype
