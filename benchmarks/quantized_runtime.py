"""A 4-bit SmolLM2 run three ways — dequantized once (float weights), and from its packed integers through PyTorch's
int4 weight-only kernels (`Int4Kernels`) — against the float model, in one run; one JSON object.

    python benchmarks/quantized_runtime.py [--device cpu|cuda] [--dtypes float32,bfloat16] [--bits 4]
                                           [--group-size 64] [--decode 1] [--new 64] [--prefill 1x128]
                                           [--eval-windows 2] [--eval-length 512] [--repeats 3] [--compile]
                                           [--converted] [--prune 0.166]

The model is captured in each dtype (so that its own float32 islands, norms and rotary, stay) and quantized there by
round to nearest (4-bit linears, group-wise scales, the tied table at 8 bits: the
kernels' speed and memory do not depend on how the integers were chosen). Per variant: the bytes of the weights it
keeps in memory (every parameter and buffer once), decode tokens/s at batch `--decode` (a 128-token prompt, then
`--new` greedy steps with the KV cache; `--compile` adds the compiled step), prefill tokens/s, and perplexity on the
first `--eval-windows` test windows (the kernels must not change the model). Every repetition runs every case of
every variant in turn (after a warm-up round), figures are medians, ratios are against the float model in float32
(or the first dtype). On CUDA the kernel takes bfloat16 only.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from speed import decode_run, prefill_run, sync  # noqa: E402 - the same timing loops as the slicing benchmark

from fxslice.core.devices import resolve_device  # noqa: E402
from fxslice.core.pass_manager import replay  # noqa: E402
from fxslice.core.program import Program  # noqa: E402
from fxslice.data import load_text, token_windows  # noqa: E402
from fxslice.evaluation.perplexity import perplexity  # noqa: E402
from fxslice.models.capture import capture_module, load_model  # noqa: E402
from fxslice.models.kvcache import capture_cached  # noqa: E402
from fxslice.passes.presets import prune_recipe  # noqa: E402
from fxslice.passes.quantize import Int4Kernels, QuantizeWeights  # noqa: E402


def _memory_bytes(program: Program) -> int:
    """Bytes of every parameter and buffer the program holds, each tensor once."""
    seen: dict[int, int] = {}
    for t in [*program.gm.parameters(), *program.gm.buffers()]:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _timed(case) -> float:
    start = time.perf_counter()
    out = case()
    tokens, seconds = out if isinstance(out, tuple) else (out, time.perf_counter() - start)
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="", help="default: float32,bfloat16 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--decode", default="1", help="batch sizes for decoding")
    parser.add_argument("--new", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--prefill", default="1x128", help="batch x length, comma-separated ('' for none)")
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--eval-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also decode through the compiled step")
    parser.add_argument("--prune", type=float, default=0.0, help="first prune this fraction of the parameters "
                        "with the Surgeon (2 shots, 4 x 256 calibration tokens): widths no kernel tile divides")
    parser.add_argument("--converted", action="store_true", help="also the float32 capture lowered by "
                        "Program.to(bfloat16) (until 2026-11-29 that computed its float32 islands in bfloat16 too)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    where = device.type
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("bfloat16" if where == "cuda" else "float32,bfloat16")).split(",")]

    module, tokenizer = load_model("smollm2")
    variants: dict[str, Program] = {}
    kept: dict[str, dict] = {}
    stored: dict[str, int] = {}
    for dtype in dtypes:  # captured in each dtype, so that the model's float32 islands (norms, rotary) stay
        name = str(dtype).replace("torch.", "")
        converted = copy.deepcopy(module).to(dtype)
        dense = capture_cached(converted)
        if args.prune:  # speed and memory do not depend on which groups go: a short calibration
            program = capture_module(converted)
            calib = token_windows(tokenizer, load_text("wikitext2:validation"), 256, count=4, seed=0)
            result = prune_recipe(target=args.prune, shots=2, batch_size=4).run(program, calibration=calib)
            replay(result.passes, dense, program)
        quantized = dense.clone()
        QuantizeWeights(args.bits, group_size=args.group_size, method="rtn")(quantized)
        stored[name] = quantized.num_bytes()
        variants[f"float_{name}"] = dense.to(device)
        variants[f"dequantized_{name}"] = quantized.to(device)
        kernels = quantized.to(device)
        kept[name] = Int4Kernels()(kernels).info["kept"]
        variants[f"int4_kernels_{name}"] = kernels
    narrower = [d for d in dtypes if d.itemsize < 4]
    if args.converted and narrower:  # the float32 capture lowered afterwards
        variants[f"float_converted_{str(narrower[0]).replace('torch.', '')}"] = capture_cached(module).to(device, narrower[0])

    cases: dict[str, object] = {}
    for b, n in (tuple(int(x) for x in spec.split("x")) for spec in args.prefill.split(",") if spec):
        cases[f"prefill_{b}x{n}"] = lambda p, b=b, n=n: prefill_run(p, b, n, where)
    for b in (int(x) for x in args.decode.split(",")):
        cases[f"decode_{b}x{args.new}"] = lambda p, b=b: decode_run(p, b, where, new=args.new)
        if args.compile:
            cases[f"decode_compiled_{b}x{args.new}"] = lambda p, b=b: decode_run(p, b, where, new=args.new, compiled=True)
    runs = {(v, c): make(variants[v]) for v in variants for c, make in cases.items()}
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # round 0 warms up (and compiles)
            for key in sorted(runs, key=lambda k: k[1]):
                sync(where)
                speed = _timed(runs[key])
                sync(where)
                if rep:
                    samples[key].append(speed)
        windows = token_windows(tokenizer, load_text("wikitext2:test"), args.eval_length)[: args.eval_windows]
        ppl = {v: perplexity(p, windows) for v, p in variants.items()} if args.eval_windows else {}

    reference = f"float_{str(dtypes[0]).replace('torch.', '')}"
    results = {}
    for v, program in variants.items():
        row: dict = {"memory_mib": round(_memory_bytes(program) / 2**20, 1),
                     "memory_vs_float": round(_memory_bytes(program) / _memory_bytes(variants[reference]), 3)}
        if v in ppl:
            row["perplexity"] = round(ppl[v], 3)
        for case in cases:
            speed = statistics.median(samples[(v, case)])
            row[case] = {"tokens_per_s": round(speed, 1),
                         "vs_float": round(speed / statistics.median(samples[(reference, case)]), 3)}
        results[v] = row
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct", "device": str(device),
        "card": torch.cuda.get_device_name(device) if where == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "bits": args.bits, "group_size": args.group_size, "stored_bytes": stored, "pruned": args.prune,
        "parameters": {v: p.num_parameters() for v, p in variants.items() if v.startswith("float_")},
        "repeats": args.repeats, "eval": {"windows": args.eval_windows, "length": args.eval_length},
        "reference": reference, "kept_in_float": kept, "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
