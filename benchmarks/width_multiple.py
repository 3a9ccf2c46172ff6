"""Which width multiple should slicing round to? Time SmolLM2 sliced to a sweep of widths; one JSON object.

    python benchmarks/width_multiple.py [--widths 384,392,...,448] [--repeats 5] [--batch 8] [--length 512]
                                        [--device cpu] [--dtype float32]

At 25% sparsity the widths rounded down to multiples of 8 / 32 / 64 / 128 are 432 / 416 / 384 / 384.
If GEMM kernels favoured aligned widths, 384, 416 and 448 would run more FLOP/s than their neighbours;
if not, rounding to coarse multiples only throws width (quality) away. Every repetition runs every
width in turn (interleaved); figures are medians: prefill tokens/s, GFLOP/s (fxslice.analysis.flops), and
batch-1 decode tokens/s (with the KV cache, 32 tokens after a 128-token prompt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fxslice.analysis.flops import count_flops
from fxslice.core.pass_manager import replay
from fxslice.data import load_text, token_windows
from fxslice.models.capture import capture_module, load_model
from fxslice.models.kvcache import capture_cached
from fxslice.passes.slicegpt.pipeline import slicegpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="384,392,400,408,416,424,432,440,448")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    module, tokenizer = load_model("smollm2")
    calib = token_windows(tokenizer, load_text("wikitext2:validation"), 256, count=4, seed=0)
    dense = capture_module(module)
    cached_dense = capture_cached(module)
    widths = [int(w) for w in args.widths.split(",")]
    models = {}
    for width in widths:
        program, cached = dense.clone(), cached_dense.clone()
        result = slicegpt(program, calib, lambda seg, full, w=width: w, batch_size=4)
        replay(result.passes, cached, program)
        if dtype != program.dtype:
            program, cached = program.to(dtype), cached.to(dtype)
        program.gm.to(args.device)
        cached.gm.to(args.device)
        models[width] = (program, cached)

    ids = torch.randint(0, 49152, (args.batch, args.length), device=args.device)
    prompt = torch.randint(0, 49152, (1, 128), device=args.device)

    def prefill(program) -> float:
        sync()
        start = time.perf_counter()
        program(ids)
        sync()
        return args.batch * args.length / (time.perf_counter() - start)

    def decode(cached, new: int = 32) -> float:
        kv = cached.cache.allocate(1, 128 + new, cached.dtype, args.device)
        token = cached.step(prompt, 0, kv)[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for i in range(new):
            token = cached.step(token, 128 + i, kv)[:, -1:].argmax(-1)
        sync()
        return new / (time.perf_counter() - start)

    samples = {w: {"prefill": [], "decode": []} for w in widths}
    with torch.no_grad():
        for rep in range(args.repeats + 1):
            for width, (program, cached) in models.items():
                p, d = prefill(program), decode(cached)
                if rep:
                    samples[width]["prefill"].append(p)
                    samples[width]["decode"].append(d)
    rows = []
    for width, (program, _) in models.items():
        flops = count_flops(program, args.batch, args.length).total
        speed = statistics.median(samples[width]["prefill"])
        rows.append({"width": width, "multiple_of": max(m for m in (8, 16, 32, 64, 128) if width % m == 0),
                     "prefill_tokens_per_s": round(speed, 1),
                     "prefill_gflop_per_s": round(flops / 1e9 * speed / (args.batch * args.length), 2),
                     "decode_tokens_per_s": round(statistics.median(samples[width]["decode"]), 2)})
    print(json.dumps({"model": "SmolLM2-135M-Instruct", "device": args.device, "dtype": args.dtype,
                      "threads": torch.get_num_threads(), "prefill": f"{args.batch}x{args.length}",
                      "repeats": args.repeats, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
