"""SliceGPT on SmolLM2-135M with the weights on the device vs offloaded (kept in host memory, one calibration stage
on the device at a time), in one run; one JSON object.

    python benchmarks/offload.py [--device auto] [--dtype float32] [--sparsity 0.25] [--calib-windows 8]
                                 [--calib-length 2048] [--eval-windows 4] [--cap-fraction 0.5]

Both runs must give the same weights (max abs difference reported) and the same perplexity; the figures that
differ are time (offloaded / on device) and the weight bytes the device holds: the whole model against the most
one stage copied there (`peak_stage_weight_bytes` of the slicegpt report). On CUDA the peak allocated memory is
measured too, and a third run slices under a cap on the device's memory of `--cap-fraction` of the model's weight
bytes (`torch.cuda.set_per_process_memory_fraction`), which the on-device run cannot fit.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import transformers
from smollm2 import smollm2_and_windows

from fxslice.core.devices import resolve_device, resolve_dtype
from fxslice.evaluation.perplexity import perplexity
from fxslice.passes import slicegpt_recipe


def _slice(program, calib, args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = slicegpt_recipe(sparsity=args.sparsity, batch_size=1).run(program, calibration=calib)
    seconds = time.perf_counter() - start
    report = next(s["report"] for s in result.record()["stages"] if s["stage"] == "slicegpt")
    return {"seconds": round(seconds, 1), "parameters": result.parameters,
            "peak_stage_weight_bytes": report.get("offload", {}).get("peak_stage_weight_bytes"),
            "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--calib-length", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--cap-fraction", type=float, default=0.5, help="CUDA: the capped run's device memory, as "
                        "a fraction of the model's weight bytes")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dense, calib, test = smollm2_and_windows(args.calib_windows, args.calib_length, args.eval_windows, dtype=dtype)
    weight_bytes = dense.num_bytes()
    runs, programs = {}, {}
    for mode in ("on_device", "offloaded"):
        program = dense.to(device) if mode == "on_device" else dense.offload(device)
        runs[mode] = _slice(program, calib, args, device)
        start = time.perf_counter()
        runs[mode]["perplexity"] = perplexity(program, test)
        runs[mode]["eval_seconds"] = round(time.perf_counter() - start, 1)
        programs[mode] = program
        print(json.dumps({mode: runs[mode]}), file=sys.stderr, flush=True)
    ours, theirs = (dict(programs[m].gm.named_parameters()) for m in ("on_device", "offloaded"))
    difference = max(float((ours[k].cpu() - theirs[k].cpu()).abs().max()) for k in ours)
    capped = None
    if device.type == "cuda":
        cap = args.cap_fraction * weight_bytes
        torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(device).total_memory)
        try:
            program = dense.offload(device)
            capped = {**_slice(program, calib, args, device), "cap_bytes": int(cap)}
            after = dict(program.gm.named_parameters())
            capped["max_abs_difference"] = max(float((after[k].cpu() - theirs[k].cpu()).abs().max()) for k in after)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
    off, on = runs["offloaded"], runs["on_device"]
    print(json.dumps({
        "benchmark": "offload", "device": str(device), "dtype": args.dtype,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "sparsity": args.sparsity, "calibration": [args.calib_windows, args.calib_length], "eval_windows": len(test),
        "weight_bytes": weight_bytes, "runs": runs, "capped": capped,
        "max_abs_difference": difference,
        "stage_share_of_weights": round(off["peak_stage_weight_bytes"] / weight_bytes, 4),
        "time_ratio_offloaded": round(off["seconds"] / on["seconds"], 3),
        "eval_time_ratio_offloaded": round(off["eval_seconds"] / on["eval_seconds"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
