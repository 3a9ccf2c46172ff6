"""The method-free core: a captured `Program`, the pass contract and its manager, graph utilities, diffs, errors.

Nothing here knows of any compression method, and nothing here imports from a layer above it
(`tests/test_layering.py` holds that).
"""

from fxslice.core.errors import (
    BadInput,
    CaptureError,
    CorruptModel,
    FxsliceError,
    InvalidOption,
    PassCheckFailed,
    SaveFailed,
    UnsupportedStructure,
)
from fxslice.core.numerics import TOLERANCE, relative_error
from fxslice.core.pass_manager import (
    Pass,
    PassManager,
    PassResult,
    PipelineResult,
    as_pass,
    check_program,
    checked_pass,
    replay,
)
from fxslice.core.program import Program

__all__ = [
    "BadInput", "CaptureError", "CorruptModel", "FxsliceError", "InvalidOption", "PassCheckFailed", "SaveFailed",
    "UnsupportedStructure", "TOLERANCE", "relative_error", "Pass", "PassManager", "PassResult", "PipelineResult",
    "as_pass", "check_program", "checked_pass", "replay", "Program",
]
