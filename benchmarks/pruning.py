"""Perplexity against real parameter count for structured pruning of SmolLM2-135M; one JSON object and a PNG.

    python benchmarks/pruning.py [--targets 0.166] [--methods surgeon,kobd,lobd,magnitude] [--shots 4]
                                 [--calib-windows 8] [--calib-length 512] [--eval-windows 8] [--slicegpt 0.25]
                                 [--slicegpt-allocation loss_aware] [--slicegpt-head-rank 16]
                                 [--masked rows_columns:0.2,2:4:0.5] [--plot pruning.png]
                                 [--recover STEPS [--recover-lr 5e-4 --recover-rank 8 --recover-batch 2]
                                  [--recover-objective lm|distill --recover-temperature 1.0]]
                                 [--tasks wikitext_cloze [--task-limit N]]

Every model is built from a recipe preset (`prune_recipe`, `slicegpt_recipe`) on a fresh copy of the same
capture; parameters are counted on the graph (shortcuts, projections and the tied table once). Calibration:
WikiText-2 validation windows (seed 0); evaluation: the first N windows of 2048 tokens of WikiText-2 test.
Scaled for 2 CPU cores (the paper: 128 x 2048 tokens and 40 shots): fewer windows, fewer shots, the same
estimator, costs, update and linear schedule. `--masked STRUCTURES:TARGET` adds the paper's zero-masked
Surgeon (the target is then the fraction of decoder-linear weights zeroed); those models keep most of their
size, so they are reported with their nonzero count too and drawn hollow at it. `--recover STEPS` then
fine-tunes every model (dense included, as the control: part of any gain is adaptation to WikiText itself) with
merged low-rank adapters on WikiText-2 validation windows of 512 tokens, and reports perplexity before and after;
`--recover-objective distill` learns the dense model's distributions instead of the text (no dense control then: the
dense model is the teacher), and `--no-unrecovered` skips the perplexity before recovery (measured in another run).
`--tasks` adds zero-shot accuracy through lm-eval for every model (before and after recovery): `wikitext_cloze`
is carried and runs offline; the harness's own tasks (piqa, arc_easy, ...) need their datasets online.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from smollm2 import smollm2_and_windows

from fxslice.evaluation.harness import evaluate_tasks
from fxslice.evaluation.perplexity import perplexity
from fxslice.passes import prune_recipe, slicegpt_recipe
from fxslice.passes.recovery.stages import Recover
from fxslice.passes.surgeon.stages import Surgeon
from fxslice.recipes import Recipe


def _peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 2**20, 3)
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", default="0.166", help="fractions of the parameters to remove, comma-separated")
    parser.add_argument("--methods", default="surgeon,kobd,lobd,magnitude")
    parser.add_argument("--masked", default="", help="STRUCTURES:TARGET pairs for the zero-masked Surgeon")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8, help="first N test windows of 2048 (0: the whole split)")
    parser.add_argument("--slicegpt", default="0.25", help="SliceGPT sparsities to compare ('' for none)")
    parser.add_argument("--slicegpt-allocation", default="constant", help="SliceGPT's widths: constant or loss_aware")
    parser.add_argument("--slicegpt-head-rank", type=int, default=0, help="SliceGPT: the tied head's correction rank")
    parser.add_argument("--slicegpt-then-surgeon", default="", help="SLICE:TARGET pairs, e.g. 0.15:0.1")
    parser.add_argument("--plot", default="pruning.png")
    parser.add_argument("--recover", type=int, default=0, help="recovery fine-tuning steps after each model (0: none)")
    parser.add_argument("--recover-lr", type=float, default=5e-4)
    parser.add_argument("--recover-rank", type=int, default=8)
    parser.add_argument("--recover-batch", type=int, default=2)
    parser.add_argument("--recover-objective", default="lm", help="lm (the text) or distill (the dense model)")
    parser.add_argument("--recover-temperature", type=float, default=1.0)
    parser.add_argument("--no-unrecovered", action="store_true",
                        help="with --recover: no perplexity before recovery (measured in another run)")
    parser.add_argument("--no-dense-control", action="store_true",
                        help="do not fine-tune the dense model as the recovery control (measured in another run)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense perplexity (measured in another run)")
    parser.add_argument("--tasks", default="", help="zero-shot lm-eval tasks for every model, e.g. wikitext_cloze "
                        "(the dense model first, even with --no-dense: the reference, and a bad name fails at once)")
    parser.add_argument("--task-limit", type=int, default=0, help="first N documents of each task (0: all)")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]

    def zero_shot(program) -> dict | None:
        return evaluate_tasks(program, tasks, limit=args.task_limit or None) if tasks else None

    dense, calib, test = smollm2_and_windows(args.calib_windows, args.calib_length, args.eval_windows)
    start = time.perf_counter()
    rows = [{"method": "dense", "parameters": dense.num_parameters(),
             "perplexity": None if args.no_dense else perplexity(dense, test),
             "seconds": round(time.perf_counter() - start, 1), "zero_shot": zero_shot(dense)}]
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    recover = Recover(steps=args.recover, lr=args.recover_lr, rank=args.recover_rank, batch_size=args.recover_batch,
                      objective=args.recover_objective, temperature=args.recover_temperature) if args.recover else None
    if recover is not None and not args.no_dense_control and not recover.learns_from_teacher:
        _recover(recover, dense.clone(), rows[0], test, zero_shot, dense)
    plans: list[tuple[str, Recipe]] = []
    for target in (float(t) for t in args.targets.split(",") if t):
        for method in (m for m in args.methods.split(",") if m):
            plans.append((method, prune_recipe(method=method, target=target, shots=args.shots, batch_size=1)))
    for pair in (p for p in args.masked.split(",") if p):
        structures, target = pair.rsplit(":", 1)
        plans.append((f"surgeon {structures}", prune_recipe(method="surgeon", target=float(target), shots=args.shots,
                                                             structures=structures, batch_size=1)))
    for sparsity in (float(s) for s in args.slicegpt.split(",") if s):
        plans.append(("slicegpt", slicegpt_recipe(sparsity=sparsity, batch_size=1, allocation=args.slicegpt_allocation,
                                                  head_rank=args.slicegpt_head_rank)))
    for pair in (p for p in args.slicegpt_then_surgeon.split(",") if p):
        sparsity, target = (float(x) for x in pair.split(":"))
        base = slicegpt_recipe(sparsity=sparsity, batch_size=1)
        stages = (*base.stages[:2], Surgeon(target=target, shots=args.shots), base.stages[2])
        plans.append(("slicegpt+surgeon", Recipe(stages, name="slicegpt+surgeon")))
    for method, recipe in plans:
        program = dense.clone()
        start = time.perf_counter()
        result = recipe.run(program, calibration=calib)
        compress_seconds = time.perf_counter() - start
        row = {"method": method, "recipe": recipe.to_dict()["stages"], "parameters": result.parameters,
               "fraction_of_dense": round(result.parameters / rows[0]["parameters"], 4),
               "nonzero_parameters": sum(int(p.count_nonzero()) for p in program.gm.parameters()),
               "perplexity": None if recover is not None and args.no_unrecovered else perplexity(program, test),
               "compress_seconds": round(compress_seconds, 1),
               "peak_rss_gib": _peak_gib(), "zero_shot": zero_shot(program)}
        shots = [r.report["shots"] for _, r in result.stages if "shots" in r.report]
        if shots and "fraction" in shots[0][-1]:  # masked: the last shot says what is zeroed where
            row["shots"] = [{k: v for k, v in s.items() if k != "per_module"} for s in shots[0]]
            row["zeroed_per_module"] = shots[0][-1]["per_module"]
        elif shots:
            row["shots"] = [{k: v for k, v in s.items() if k != "per_module"} for s in shots[0]]
            total: dict[str, int] = {}
            for shot in shots[0]:
                for module, count in shot["per_module"].items():
                    total[module] = total.get(module, 0) + count
            row["removed_per_module"] = dict(sorted(total.items(), key=lambda kv: -kv[1]))
        if recover is not None:
            _recover(recover, program, row, test, zero_shot, dense)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("recipe", "shots")}), file=sys.stderr, flush=True)
    if args.plot:
        _plot(rows, args.plot)
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32)",
        "calibration": {"text": "wikitext2:validation", "windows": args.calib_windows, "length": args.calib_length},
        "evaluation": {"text": "wikitext2:test", "windows": len(test), "length": 2048},
        "shots": args.shots, "recover": None if recover is None else recover.to_dict(),
        "tasks": {"names": tasks, "limit": args.task_limit or None} if tasks else None,
        "threads": torch.get_num_threads(), "plot": args.plot or None, "results": rows,
    }, indent=1))


def _recover(stage: Recover, program, row: dict, test: torch.Tensor, zero_shot, dense) -> None:
    """Fine-tune `program` in place (a distilling stage learns from `dense`) and add the recovered perplexity (and
    zero-shot figures) and the training figures to `row`."""
    start = time.perf_counter()
    result = Recipe((stage,)).run(program, progress=sys.stderr.isatty(), teacher=dense)
    report = result.stages[0][1].report
    row["perplexity_recovered"] = perplexity(program, test)
    row["recovered_parameters"] = program.num_parameters()
    row["recover_seconds"] = round(time.perf_counter() - start, 1)
    row["zero_shot_recovered"] = zero_shot(program)
    row["recover"] = {k: report[k] for k in ("held_out_before", "held_out_after", "tokens", "training_windows")}
    row["recover"]["loss_first_last_10"] = [sum(report["losses"][:10]) / 10, sum(report["losses"][-10:]) / 10]
    print(json.dumps({"method": row["method"], "recovered": row["perplexity_recovered"],
                      "zero_shot": row["zero_shot_recovered"], **row["recover"]}),
          file=sys.stderr, flush=True)


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fxslice[bench]'): no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    dense = rows[0]
    for method in dict.fromkeys(r["method"] for r in rows[1:]):
        masked = " " in method
        size = "nonzero_parameters" if masked else "parameters"
        points = sorted((r[size] / 1e6, r["perplexity"]) for r in rows
                        if r["method"] == method and r["perplexity"] is not None)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", markerfacecolor="none" if masked else None,
                    label=method + (" (zeros: nonzero count)" if masked else ""), linestyle=":" if masked else "-")
        healed = sorted((r[size] / 1e6, r["perplexity_recovered"]) for r in rows
                        if r["method"] == method and "perplexity_recovered" in r)
        if healed:
            ax.plot(*zip(*healed, strict=True), marker="^", linestyle="--", label=f"{method} + recovery")
    if "perplexity_recovered" in dense:
        ax.plot([dense["parameters"] / 1e6], [dense["perplexity_recovered"]], marker="*", markersize=12,
                color="grey", linestyle="none", label="dense + recovery (control)")
    ax.plot([dense["parameters"] / 1e6], [dense["perplexity"]], marker="*", markersize=12, color="black",
            linestyle="none", label=f"dense ({dense['parameters'] / 1e6:.1f} M)")
    smallest = min(min(r["parameters"], r.get("nonzero_parameters", r["parameters"])) for r in rows) / 1e6
    ax.set_xlim(smallest - 0.08 * (dense["parameters"] / 1e6 - smallest) - 1, dense["parameters"] / 1e6 + 2)
    ax.set_xlabel("parameters (M, counted on the graph)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: perplexity against size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
