"""Recover a saved compressed model by distillation from the dense default model (SmolLM2-135M-Instruct), then
measure it; one JSON object.

    python benchmarks/distill.py MODEL_DIR [--steps 200] [--lr 2e-3] [--rank 8] [--method lora|full] [--temperature 1.0]
                                 [--objective distill] [--eval-windows all] [--out DIR]

The teacher is the dense model captured afresh (the program before compression, as `fxslice prune
--recover-objective distill` uses it inside one job); the student is `fxslice.load(MODEL_DIR)`, trained through its
KV-cache graph. Training text: WikiText-2 validation (never the test split), 8 windows held out and scored before
and after. Perplexity on the first 8 test windows of 2048 tokens and, with `--eval-windows all`, on the whole test
split (148 windows), after recovery; the model is saved to `--out` before the evaluation.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fxslice
from fxslice import Recipe
from fxslice.data import load_text, token_windows
from fxslice.evaluation.perplexity import perplexity
from fxslice.passes.recovery.stages import Recover


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a directory saved by fxslice (a compressed SmolLM2)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8, help="adapter rank (alpha is twice the rank)")
    parser.add_argument("--method", default="lora", help="lora (adapters, merged) or full (the weights in place)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--objective", default="distill", help="distill (from dense) or lm (next tokens)")
    parser.add_argument("--eval-windows", default="8", help="test windows of 2048 tokens: a number or 'all'")
    parser.add_argument("--out", default="", help="save the recovered model here")
    args = parser.parse_args()
    torch.manual_seed(0)
    student = fxslice.load(args.model)
    dense = fxslice.capture(fxslice.DEFAULT_MODEL) if args.objective == "distill" else None
    start = time.perf_counter()
    stage = Recover(steps=args.steps, lr=args.lr, rank=args.rank, alpha=2.0 * args.rank, objective=args.objective,
                    temperature=args.temperature, method=args.method)
    result = Recipe([stage]).run(student, teacher=dense, progress=True)
    seconds = time.perf_counter() - start
    del dense
    if args.out:
        fxslice.save(student, args.out)
    test = token_windows(student.tokenizer, load_text("wikitext2:test"), 2048)
    evaluated = test if args.eval_windows == "all" else test[: int(args.eval_windows)]
    start = time.perf_counter()
    value = perplexity(student, evaluated, progress=True)
    report = result.stages[-1][1].report
    print(json.dumps({
        "model": args.model, "parameters": student.num_parameters(), "saved": args.out or None,
        "recover": {"steps": args.steps, "lr": args.lr, "temperature": args.temperature, "objective": args.objective,
                    "text": stage.text, "batch_size": stage.batch_size, "method": stage.method,
                    **({"rank": stage.rank} if stage.method == "lora" else {})},
        "held_out_loss": [report["held_out_before"], report["held_out_after"]],
        "loss_first_last_10_steps": [sum(part) / len(part) for part in (report["losses"][:10], report["losses"][-10:])],
        "train_seconds": round(seconds, 1),
        "evaluation": {"text": "wikitext2:test", "windows": len(evaluated), "length": 2048},
        "perplexity": value, "eval_seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
    }, indent=1))


if __name__ == "__main__":
    main()
