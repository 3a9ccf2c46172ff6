"""fxslice: structured compression of transformer LMs as a graph-transform compiler over torch.fx.

A model is captured once as an ATen-level graph (`capture`) into a `Program`; every compression step
is a `Pass` run by a `PassManager`, which checks the graph after each one and records what it changed
(`fxslice.core.diff`). Methods are stages of a `Recipe` (`fxslice.recipes`); the built-in passes and
stages are in `fxslice.passes` and use nothing but this public API.

Layers, each importing only those before it: `core` (program, passes, graph utilities, errors) ->
`analysis` (matchers, residual stream, roles) -> `calibration` (staged runner, observers, gradients);
`data`, `models` (capture, save/load), `evaluation` and `recipes` beside them; `jobs` (`compress`: the whole
job in one call) above them; `cli` on top.
"""

# the core's public names, re-exported whole (fxslice.core lists them)
from fxslice.core import *  # noqa: F403
from fxslice.core import __all__ as _core_names
from fxslice.core.version import __version__
from fxslice.jobs import Report, compress
from fxslice.models.capture import DEFAULT_MODEL, capture, capture_module
from fxslice.models.io import load, save
from fxslice.recipes import Recipe, Stage

__all__ = [
    *(n for n in _core_names if n not in ("TOLERANCE", "relative_error")), "DEFAULT_MODEL", "Recipe", "Report", "Stage",
    "__version__", "capture", "capture_module", "compress", "load", "save",
]
