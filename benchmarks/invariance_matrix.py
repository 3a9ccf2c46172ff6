"""Fuse + rotate (a different random Q per segment) on every tiny family; one JSON object.

    python benchmarks/invariance_matrix.py [--smollm2]

Per class: "exact" with the max relative logit error in float64 and float32, "refused" with the
reason, or "failed" with the error (a bug).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fxslice import FxsliceError, PassManager, UnsupportedStructure, capture
from fxslice.core import relative_error
from fxslice.models.capture import load_model
from fxslice.passes import exact_pipeline
from fxslice.passes.slicegpt.rotations import random_orthogonal
from fxslice.testing import TINY_CONFIGS, tiny_causal_lm


def max_relative_error(program, dtype) -> float:
    program = program.to(dtype)
    ids = program.probe_input()
    with torch.no_grad():
        before = program(ids).double()
        PassManager(exact_pipeline(random_orthogonal(7)), check_numerics=False).run(program)
        after = program(ids).double()
    return relative_error(after, before)


def check(name: str, model: torch.nn.Module) -> dict:
    start = time.perf_counter()
    try:
        program = capture(model)
        row = {"class": type(model).__name__, "status": "exact",
               "fp64": max_relative_error(program, torch.float64), "fp32": max_relative_error(program, torch.float32)}
        if row["fp64"] > 1e-9 or row["fp32"] > 1e-4:
            row["status"] = "failed"
    except UnsupportedStructure as exc:
        row = {"class": type(model).__name__, "status": "refused", "why": str(exc).splitlines()[1][:200]}
    except (FxsliceError, RuntimeError, ValueError) as exc:
        row = {"class": type(model).__name__, "status": "failed", "why": f"{type(exc).__name__}: {str(exc)[:200]}"}
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smollm2", action="store_true", help="also run the real SmolLM2-135M")
    args = parser.parse_args()
    rows = {name: check(name, tiny_causal_lm(name)) for name in sorted(TINY_CONFIGS)}
    if args.smollm2:
        rows["smollm2"] = check("smollm2", load_model("smollm2")[0])
    counts = {s: sum(r["status"] == s for r in rows.values()) for s in ("exact", "refused", "failed")}
    print(json.dumps({"models": rows, "counts": counts, "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
