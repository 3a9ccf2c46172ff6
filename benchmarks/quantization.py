"""Perplexity against bytes for weight quantization of SmolLM2-135M (dense, and optionally after pruning); one
JSON object.

    python benchmarks/quantization.py [--bits 8,4,3] [--methods rtn,gptq] [--group-size 64] [--grid zero_point]
                                      [--embeddings 8]
                                      [--untie --head 8]
                                      [--calib-windows 16] [--calib-length 512] [--eval-windows 8]
                                      [--prune 0.166 --shots 4] [--pruned DIR] [--slice 0.25 [--combined-only]]
                                      [--rotate]
                                      [--learned-rotation 100] [--rotate-heads]
                                      [--no-dense]
                                      [--search mtgp,gp,random --budget-bits 4.0 --evaluations 6 --seeds 0]
                                      [--fixed-tables] [--no-float]

Bytes are the weights as stored (packed integers, float16 scales and zero points, float tensors in float32, the
tied table once), from `Program.num_bytes()`, the figure a saved model's record gives. Calibration: WikiText-2
validation (seed 0); evaluation: the first N windows of 2048 tokens of WikiText-2 test. Every model comes from
one capture; `--prune` quantizes the Surgeon's pruned model as well (`--pruned DIR`: a saved one, e.g. pruned with
more calibration or recovered), `--slice` SliceGPT's, and both together the
Surgeon's pruning of the sliced model (slice -> prune -> quantize on one plane);
`--rotate` quantizes each model once more after an exact randomized-Hadamard rotation of its stream (QuaRot-style),
`--learned-rotation STEPS` once more after the Hadamard and a rotation learned against the rounding (SpinQuant-style);
`--rotate-heads` adds the same with each attention value head turned with the stream (a Hadamard per head, learned
with it), beside the rows without.
`--search` runs the mixed-precision searches on every model (the dense one unless `--no-dense`) at `--budget-bits`
(default: the bits per parameter of dense uniform 4-bit GPTQ, so the comparison is at its bytes) with the same number
of expensive evaluations each, and draws them;
they choose the token table's width too (up to `--embeddings`) unless `--fixed-tables`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from smollm2 import smollm2_and_windows

from fxslice import load
from fxslice.evaluation.perplexity import perplexity
from fxslice.passes.presets import prune_recipe, slicegpt_recipe
from fxslice.passes.quantize.allocation import width_counts
from fxslice.passes.quantize.stages import Quantize
from fxslice.passes.rewrite.stages import Cleanup
from fxslice.passes.slicegpt.stages import Rotate
from fxslice.recipes import Recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", default="8,4,3")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--grid", default="zero_point", help="zero_point, offset (llama.cpp's Q4_1) or symmetric")
    parser.add_argument("--embeddings", type=int, default=8, help="bits of the (tied) token table; 0 keeps it float")
    parser.add_argument("--untie", action="store_true", help="give the tied head its own table, at --head bits")
    parser.add_argument("--head", type=int, default=None, help="bits of an untied head (default: --embeddings; 0 "
                        "keeps it float)")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--prune", type=float, default=0.0, help="also quantize the Surgeon's model at this target")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--pruned", default="", help="also quantize this saved model (fxslice.save's directory)")
    parser.add_argument("--pruned-label", default="", help="the saved model's name in the rows, as its steps joined "
                        "by ' + ' (e.g. 'surgeon 0.166 + distilled'; default: 'saved DIRNAME')")
    parser.add_argument("--slice", type=float, default=0.0, help="also quantize SliceGPT's model at this sparsity "
                        "(constant widths, the tied head's rank-16 correction), and with --prune the Surgeon's "
                        "pruning of it: slice -> prune -> quantize")
    parser.add_argument("--rotate", action="store_true",
                        help="also quantize each model after an exact randomized-Hadamard rotation of its stream")
    parser.add_argument("--rotated-only", action="store_true", help="with --rotate: quantize only the rotated "
                        "copies of the models")
    parser.add_argument("--rotate-heads", action="store_true", help="--rotate and --learned-rotation also once "
                        "with each attention value head turned too")
    parser.add_argument("--learned-rotation", type=int, default=0, metavar="STEPS", help="also quantize each model "
                        "after the Hadamard and a rotation learned against the rounding in STEPS steps (SpinQuant); each --search "
                        "runs with and without it")
    parser.add_argument("--combined-only", action="store_true", help="with --slice and --prune, quantize only the "
                        "slice -> prune model, not the sliced and the pruned ones on their own")
    parser.add_argument("--no-dense", action="store_true", help="quantize only the sliced / pruned models (the dense "
                        "float row stays, as the reference)")
    parser.add_argument("--search", default="", help="searches to compare: mtgp,gp,random")
    parser.add_argument("--budget-bits", type=float, default=0.0, help="0: uniform 4-bit GPTQ's bits per parameter")
    parser.add_argument("--evaluations", type=int, default=6, help="expensive evaluations per search")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--fixed-tables", action="store_true", help="the searches keep the table at --embeddings "
                        "bits (by default they choose its width too)")
    parser.add_argument("--no-float", action="store_true", help="skip the float32 rows (known: saves a whole-split "
                        "evaluation per model)")
    parser.add_argument("--plot", default="quantization-search.png")
    args = parser.parse_args()
    if args.combined_only and not (args.slice and args.prune):
        parser.error("--combined-only needs both --slice and --prune")
    if args.rotated_only and not args.rotate:
        parser.error("--rotated-only needs --rotate")
    uniform4 = "4" in args.bits.split(",") and "gptq" in args.methods.split(",") and not args.no_dense
    if args.search and not args.budget_bits and not uniform4:  # the default budget is that row's, found at the end
        parser.error("--search needs --budget-bits unless the run quantizes the dense model to 4-bit GPTQ "
                     "(--bits 4 --methods gptq without --no-dense), whose bits per parameter are the default budget")
    if args.search and args.plot:
        try:  # found now, not after an hour of searching
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install -e '.[bench]' (or --plot '')")
    head = args.embeddings if args.head is None else args.head
    dense, calib, test = smollm2_and_windows(args.calib_windows, args.calib_length, args.eval_windows)
    bases = [("dense", dense, 0.0)]
    if args.prune and not args.combined_only:
        pruned = dense.clone()
        start = time.perf_counter()
        prune_recipe(target=args.prune, shots=args.shots, batch_size=1).run(pruned, calibration=calib)
        bases.append((f"surgeon {args.prune}", pruned, time.perf_counter() - start))
    if args.pruned:
        bases.append((args.pruned_label or f"saved {Path(args.pruned).name}", load(args.pruned), 0.0))
    if args.slice:
        sliced = dense.clone()
        start = time.perf_counter()
        slicegpt_recipe(sparsity=args.slice, head_rank=16).run(sliced, calibration=calib)
        if not args.combined_only:
            bases.append((f"slicegpt {args.slice}", sliced, time.perf_counter() - start))
        if args.prune:
            both = sliced.clone()
            prune_recipe(target=args.prune, shots=args.shots, batch_size=1).run(both, calibration=calib)
            bases.append((f"slicegpt {args.slice} + surgeon {args.prune}", both,
                          time.perf_counter() - start))  # slicing and pruning together
    if args.rotate:
        for base_name, base, _ in list(bases):
            if args.no_dense and base is dense:
                continue
            for heads in (False, True) if args.rotate_heads else (False,):
                rotated = base.clone()
                start = time.perf_counter()
                Recipe((Cleanup(), Rotate(rotation="hadamard", heads=heads))).run(rotated)
                bases.append((f"{base_name} + hadamard{' with heads' if heads else ''}", rotated,
                              time.perf_counter() - start))
        if args.rotated_only:
            bases = [b for b in bases if "hadamard" in b[0] or (b[1] is dense and args.no_dense)]
    rows = []
    rotations = ["none", *(["learned"] if args.learned_rotation else []),
                 *(["learned with heads"] if args.learned_rotation and args.rotate_heads else [])]

    def quantized(base, rotation: str, **options) -> tuple:
        """A copy of `base` through `Quantize(**options)` with the run's grid and tables, after the learned rotation
        when `rotation` asks for it: (the program, the stage's report, seconds)."""
        learned = (dict(rotation="learned", rotation_steps=args.learned_rotation,
                        rotate_heads=rotation == "learned with heads") if rotation != "none" else {})
        stage = Quantize(group_size=args.group_size, grid=args.grid, embeddings=args.embeddings or None,
                         head=head or None, untie_head=args.untie, **options, **learned)
        program = base.clone()
        start = time.perf_counter()
        stages = (Cleanup(), stage) if rotation != "none" else (stage,)  # the Hadamard needs a clean graph
        result = Recipe(stages).run(program, calibration=calib, progress=sys.stderr.isatty())
        return program, result.stages[-1][1].report, time.perf_counter() - start

    for base_name, base, seconds in bases:
        if not args.no_float:
            rows.append(_row(base_name, "float32", base, test, seconds, dense))
        if args.no_dense and base is dense:
            continue
        for bits in (int(b) for b in args.bits.split(",") if b):
            for method, rotation in itertools.product((m for m in args.methods.split(",") if m), rotations):
                if rotation != "none" and "hadamard" in base_name:
                    continue  # a learned rotation starts from its own Hadamard
                program, report, seconds = quantized(base, rotation, bits=bits, method=method)
                weights = f"{method} {bits}-bit" + _rotation_label(rotation)
                rows.append(_row(base_name, weights, program, test, seconds, dense))
                if rotation != "none":
                    rows[-1]["rotation"] = report["rotation"]
    for row in rows:  # the uniform rows' token table (a search chooses its own width up to --embeddings)
        row["table"] = _width(args.embeddings) + (f", untied head {_width(head)}" if args.untie else ", tied")
        row["grid"], row["group_size"] = args.grid, args.group_size
    searches = []
    budget = 0.0
    if args.search:
        budget = args.budget_bits or next(8 * r["bytes"] / r["parameters"] for r in rows  # exact, not rounded
                                          if r["model"] == "dense" and r["weights"] == "gptq 4-bit")
    searched = [(name, base) for name, base, _ in bases if not (args.no_dense and base is dense)]
    for seed in (int(s) for s in args.seeds.split(",")):  # seed by seed: a stopped run keeps whole comparisons
        for (base_name, base), search, rotation in itertools.product(
                searched, (s for s in args.search.split(",") if s), rotations):
            if rotation != "none" and "hadamard" in base_name:
                continue
            program, report, seconds = quantized(base, rotation, search=search, budget_bits=budget, method="gptq",
                                                 evaluations=args.evaluations, seed=seed,
                                                 search_tables=not args.fixed_tables)
            weights = f"{search} search at {budget:.3f} bits" + _rotation_label(rotation)
            row = _row(base_name, weights, program, test, seconds, dense)
            row.update({"search": search, "seed": seed, "budget_bits": budget, "search_tables": not args.fixed_tables,
                        "best": report["search"]["best"],
                        "widths": width_counts(report["weights"]), "evaluations": report["search"]["evaluations"],
                        "best_loss_after": best_loss_after(report["search"]["evaluations"])})
            print(json.dumps({"search_row": row}, default=float), file=sys.stderr, flush=True)  # kept if stopped later
            searches.append(row)
    if searches and args.plot:
        _plot(searches, rows, args.plot)
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "group_size": args.group_size, "grid": args.grid, "embedding_bits": args.embeddings or None, "head_bits": head or None,
        "untied": args.untie,
        "calibration": {"text": "wikitext2:validation", "windows": args.calib_windows, "length": args.calib_length},
        "evaluation": {"text": "wikitext2:test", "windows": len(test), "length": 2048},
        "threads": torch.get_num_threads(), "results": rows, "searches": searches,
    }, indent=1))


def _rotation_label(rotation: str) -> str:
    return {"none": "", "learned": " + learned rotation", "learned with heads": " + learned rotation with heads"}[rotation]


def _width(bits: int | None) -> str:
    return f"{bits}-bit" if bits else "float"


def best_loss_after(evaluations: list[dict]) -> list[float]:
    """The lowest expensive-task loss found after 1, 2, ... expensive evaluations (values are negated losses):
    how many expensive evaluations each search needs to reach a given result."""
    best, curve = float("inf"), []
    for evaluation in evaluations:
        if evaluation["task"] == 1:
            best = min(best, -evaluation["value"])
            curve.append(round(best, 5))
    return curve


def _row(base: str, weights: str, program, test: torch.Tensor, seconds: float, dense) -> dict:
    row = {"model": base, "weights": weights, "parameters": program.num_parameters(), "bytes": program.num_bytes(),
           "bytes_vs_dense_float32": round(program.num_bytes() / dense.num_bytes(), 4),
           "bits_per_parameter": round(8 * program.num_bytes() / program.num_parameters(), 3),
           "perplexity": perplexity(program, test), "seconds": round(seconds, 1)}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def _plot(searches: list[dict], rows: list[dict], path: str) -> None:
    """Left: every evaluation of every search (validation loss against bits per parameter, cheap hollow);
    right: the final models' test perplexity against bytes, with the uniform quantizations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"mtgp": "tab:blue", "gp": "tab:orange", "random": "tab:green"}
    for row in searches:
        for task, marker in ((0, "o"), (1, "s")):
            points = [(e["info"]["bits_per_parameter"], -e["value"]) for e in row["evaluations"] if e["task"] == task]
            if points:
                left.scatter(*zip(*points, strict=True), marker=marker, s=22, color=colours.get(row["search"]),
                             facecolors="none" if task == 0 else colours.get(row["search"]),
                             label=f"{row['search']} ({'RTN, few windows' if task == 0 else 'GPTQ'})")
    left.axvline(searches[0]["budget_bits"], color="grey", linestyle=":", label="budget")
    left.set_xlabel("bits per parameter (tables, scales, float tensors included)")
    left.set_ylabel("validation loss (nats)")
    left.set_title("search evaluations")
    handles, labels = left.get_legend_handles_labels()
    left.legend(dict(zip(labels, handles, strict=True)).values(), dict(zip(labels, handles, strict=True)).keys(),
                fontsize=7)
    for row in rows:
        if row["weights"] != "float32":
            dense = row["model"] == "dense"
            right.scatter(row["bytes"] / 2**20, row["perplexity"], color="black" if dense else "grey",
                          marker="x" if dense else "+")
            label = row["weights"] if dense else f"{row['model']}, {row['weights']}"
            right.annotate(label, (row["bytes"] / 2**20, row["perplexity"]), fontsize=7)
    sizes = {"mtgp": 150, "gp": 80, "random": 30}  # nested, so that searches answering the same point all show
    for row in sorted(searches, key=lambda r: -sizes.get(r["search"], 60)):  # largest first
        right.scatter(row["bytes"] / 2**20, row["perplexity"], color=colours.get(row["search"]),
                      marker="*os^v"[row["seed"] % 5], s=sizes.get(row["search"], 60), alpha=0.9,
                      label=f"{row['search']} (seed {row['seed']})"
                      + ("" if row["model"] == "dense" else f", {row['model']}"))
    right.margins(x=0.12)
    right.set_xlabel("MiB as stored")
    right.set_ylabel("WikiText-2 test perplexity")
    values = [r["perplexity"] for r in rows + searches if r["weights"] != "float32"]
    if max(values) > 3 * min(values):
        right.set_yscale("log")
    right.set_title("SmolLM2-135M: quantized models")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
