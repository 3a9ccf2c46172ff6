"""Perplexity of SmolLM2-135M sliced at several sparsities; one JSON object.

    python benchmarks/quality.py [--calib-windows 32] [--calib-length 2048] [--eval-windows N] [--untie]
                                 [--shared-basis none|block|stream] [--multiple 8] [--allocations constant,loss_aware]
                                 [--refits off,readers,writers,both] [--head-ranks 0,32]

Calibration: WikiText-2 *validation* windows (the train split used by the SliceGPT paper is not
available offline). Evaluation: WikiText-2 test, joined with "\\n\\n", non-overlapping windows,
the first N windows (all by default). Parameters include shortcut matrices and any untied head.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from fxslice import capture
from fxslice.data import load_text, token_windows
from fxslice.evaluation.perplexity import perplexity
from fxslice.models.capture import load_model
from fxslice.passes import slicegpt_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sparsities", default="0,0.1,0.2,0.25,0.3")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--calib-length", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--eval-length", type=int, default=2048)
    parser.add_argument("--untie", action="store_true", help="untie the head instead of keeping the tie")
    parser.add_argument("--shared-basis", default="none", choices=["none", "block", "stream"],
                        help="block: one basis per block (half the shortcuts); stream: one for the whole stream (none)")
    parser.add_argument("--multiple", type=int, default=8, help="round widths down to a multiple of this")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--allocations", default="constant", help="constant,loss_aware: segment widths at equal "
                        "parameter count, constant or from the loss's curvature")
    parser.add_argument("--sensitivity-windows", type=int, default=4, help="windows of the loss-aware gradient pass")
    parser.add_argument("--refits", default="off", help="off,readers,writers,both: refit the linears at the sliced "
                        "stream to the unsliced model (closed form); each is one row")
    parser.add_argument("--refit-damping", type=float, default=0.01)
    parser.add_argument("--head-ranks", default="0", help="0,32: rank of the tied head's correction (0: none)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense perplexity (measured in another run)")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    dense = capture(model)
    calib = token_windows(tokenizer, load_text("wikitext2:validation"), args.calib_length, count=args.calib_windows, seed=0)
    test = token_windows(tokenizer, load_text("wikitext2:test"), args.eval_length)
    test = test[: args.eval_windows] if args.eval_windows else test
    start = time.perf_counter()
    rows = [{"sparsity": "dense", "width": 576, "parameters": dense.num_parameters(),
             "perplexity": None if args.no_dense else perplexity(dense, test, batch_size=args.batch_size)}]
    rows[0]["seconds"] = round(time.perf_counter() - start, 1)
    refits, head_ranks = args.refits.split(","), [int(r) for r in args.head_ranks.split(",")]
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        for allocation, refit, head_rank in ((a, r, h) for a in args.allocations.split(",") for r in refits
                                             for h in head_ranks):
            if (allocation == "loss_aware" or refit != "off" or head_rank) and sparsity == 0:
                continue
            start = time.perf_counter()
            program = dense.clone()
            recipe = slicegpt_recipe(sparsity=sparsity, multiple=args.multiple, keep_ties=not args.untie,
                                     shared_basis=args.shared_basis, batch_size=args.batch_size, allocation=allocation,
                                     sensitivity_windows=args.sensitivity_windows, refit=refit,
                                     refit_damping=args.refit_damping, head_rank=head_rank)
            report = recipe.run(program, calibration=calib).stages[1][1].report
            rows.append({
                "sparsity": sparsity,
                "allocation": allocation,
                "refit": report.get("refit", False),
                "head_correction": report.get("head_correction", False),
                "widths": report["widths"],
                "parameters": program.num_parameters(),
                "perplexity": perplexity(program, test, batch_size=args.batch_size),
                "min_variance_kept": round(min(report["variance_kept"]), 4),
                "seconds": round(time.perf_counter() - start, 1),
            })
            print(json.dumps(rows[-1]), flush=True, file=sys.stderr)
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "head": "untied" if args.untie else "tied (kept)",
        "shared_basis": args.shared_basis,
        "width_multiple": args.multiple,
        "refit_damping": args.refit_damping,
        "calibration": {"text": "wikitext2:validation", "windows": args.calib_windows, "length": args.calib_length, "seed": 0},
        "evaluation": {"text": "wikitext2:test", "windows": len(test), "length": args.eval_length},
        "threads": torch.get_num_threads(),
        "results": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
