"""Wall time and peak memory of each stage of slicing SmolLM2-135M at 25%; one JSON object.

    python benchmarks/compile_cost.py [--calib-windows 16] [--calib-length 2048]

The key figure is `calibration_over_forward`: calibrate-and-slice time divided by the time of one plain
forward pass of the dense model over the same calibration windows (design.md §4: close to 1).
Peak memory is the process's peak resident set during the stage (Linux VmHWM, reset before each stage).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fxslice import capture
from fxslice.data import load_text, token_windows
from fxslice.models.capture import load_model
from fxslice.passes.facts import CLEAN
from fxslice.passes.rewrite.stages import Cleanup
from fxslice.passes.slicegpt.stages import SliceGPT
from fxslice.recipes import Recipe


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 3)
    return float("nan")


def stage(name: str, fn, out: dict):
    _reset_peak()
    start = time.perf_counter()
    result = fn()
    out[name] = {"seconds": round(time.perf_counter() - start, 2), "peak_rss_gib": _peak_gib()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--calib-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    stages: dict = {}
    model, tokenizer = stage("load", lambda: load_model("smollm2"), stages)
    program = stage("capture", lambda: capture(model), stages)
    calib = token_windows(tokenizer, load_text("wikitext2:validation"), args.calib_length, count=args.calib_windows, seed=0)

    def forward():
        with torch.no_grad():
            for batch in calib.split(args.batch_size):
                program(batch)

    stage("clean_up", lambda: Recipe((Cleanup(),)).run(program), stages)
    stage("dense_forward_over_calibration", forward, stages)  # on the cleaned-up graph, as calibration runs it
    recipe = Recipe((SliceGPT(sparsity=0.25, batch_size=args.batch_size),), start=("captured", CLEAN))
    result = stage("fuse_calibrate_and_slice", lambda: recipe.run(program, calibration=calib), stages)
    passes = {r.name: r.seconds for _, s in result.stages for r in s.records}
    stages["fuse"] = {"seconds": round(passes["project_norm_writers"] + passes["fuse_norms"], 2)}
    stages["calibrate_and_slice"] = {"seconds": round(passes["slice_stream"], 2),
                                     "peak_rss_gib": stages["fuse_calibrate_and_slice"]["peak_rss_gib"]}
    ratio = stages["calibrate_and_slice"]["seconds"] / stages["dense_forward_over_calibration"]["seconds"]
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct", "sparsity": 0.25, "threads": torch.get_num_threads(),
        "calibration": {"windows": args.calib_windows, "length": args.calib_length, "batch_size": args.batch_size},
        "stages": stages, "calibration_over_forward": round(ratio, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
