"""fxslice: SliceGPT as a graph-transform compiler over torch.fx.

Public API: capture a model as a `Program`, write passes on `Pass`/`PassManager`, inspect what
they changed with `fxslice.core.diff`. The built-in passes live in the separate `passes` package and
use nothing but this API.
"""

from fxslice.core.errors import (
    BadInput,
    CaptureError,
    CorruptModel,
    FxsliceError,
    InvalidOption,
    PassCheckFailed,
    UnsupportedStructure,
)
from fxslice.core.pass_manager import Pass, PassManager, PassResult, PipelineResult, as_pass, check_program, replay
from fxslice.core.program import Program
from fxslice.models.capture import DEFAULT_MODEL, capture, capture_module

__version__ = "0.1.0"

__all__ = [
    "BadInput",
    "CaptureError",
    "CorruptModel",
    "DEFAULT_MODEL",
    "FxsliceError",
    "InvalidOption",
    "Pass",
    "PassCheckFailed",
    "PassManager",
    "PassResult",
    "PipelineResult",
    "Program",
    "UnsupportedStructure",
    "as_pass",
    "capture",
    "capture_module",
    "check_program",
    "replay",
]
