"""Dense vs sliced and pruned SmolLM2-135M, prefill and KV-cache decode throughput, in one run; one JSON object.

    python benchmarks/speed.py [--sparsities 0.25,0.5] [--prune 0.166] [--repeats 5] [--shared-basis 0.25] [--multiple 8]
                               [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--prefill 1x512,8x512,1x2048]
                               [--decode 1,8] [--compile]

Every repetition runs every case on every model in turn (interleaved, after one warm-up round), so that
a noisy shared machine slows all models alike; figures are medians. Speed-ups are sliced / dense
throughput (pruned: the Surgeon's groups, `--prune` fractions of the parameters, 2 shots: speed does not
depend on which groups go), next to the ideal speed-up from the graph's FLOP counts (fxslice.analysis.flops) and their ratio
(efficiency). Decode: a 128-token prompt, then 128 new tokens one at a time with the cache (greedy);
`--compile` adds the same through the compiled step (`generate(compile=True)`; CUDA graphs on a GPU) and
transformers' own `generate()` on the dense model, and reports each decode case against the latter.
Memory: weight bytes, and the peak resident memory a case adds on top of what was resident before it
(CPU: Linux VmHWM; CUDA: max_memory_allocated). Calibration uses a few windows only: speed does not
depend on the quality of the bases.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers

from fxslice.analysis.flops import count_flops
from fxslice.core.pass_manager import replay
from fxslice.core.program import Program
from fxslice.data import load_text, token_windows
from fxslice.evaluation.generate import decoding_step
from fxslice.models.capture import capture_module, load_model
from fxslice.models.kvcache import capture_cached
from fxslice.passes.presets import prune_recipe
from fxslice.passes.rewrite.stages import Cleanup, FuseGQA
from fxslice.passes.slicegpt.pipeline import slicegpt
from fxslice.passes.slicegpt.slice_stream import constant_widths, per_block
from fxslice.recipes import Recipe


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _resident_bytes(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else _status_bytes("VmRSS")


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def _peak_bytes(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else _status_bytes("VmHWM")


def prefill_run(program: Program, batch: int, length: int, device: str):
    ids = torch.randint(0, program.vocab_size, (batch, length), device=device)

    def run() -> int:
        program(ids)
        return batch * length

    return run


def decode_run(program: Program, batch: int, device: str, prompt: int = 128, new: int = 128, compiled: bool = False):
    """Greedy decoding of `new` tokens after a `prompt`-token prefill; `compiled`: the steps through
    `decoding_step(compile=True)` (compiled in the warm-up round, as `generate(compile=True)` does on its first step)."""
    ids = torch.randint(0, program.vocab_size, (batch, prompt), device=device)
    step = decoding_step(program, compile=compiled)
    kv = program.cache.allocate(batch, prompt + new, program.dtype, torch.device(device))

    def run() -> tuple[int, float]:
        token = program.step(ids, 0, kv)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        start = time.perf_counter()
        for i in range(new):
            token = step(token, prompt + i, kv)[:, -1].argmax(-1, keepdim=True)
        sync(device)
        return batch * new, time.perf_counter() - start

    return run


def _hf_generate(module: torch.nn.Module, batch: int, device: str, prompt: int = 128, new: int = 128):
    """transformers' own `generate()` (greedy, its default cache), the baseline users compare with."""
    ids = torch.randint(0, module.config.vocab_size, (batch, prompt), device=device)

    def run() -> tuple[int, float]:
        sync(device)
        start = time.perf_counter()
        module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                        do_sample=False, pad_token_id=0)
        sync(device)
        return batch * new, time.perf_counter() - start

    return run


def _time(case, device: str) -> tuple[float, int]:
    """(tokens per second, peak bytes added) of one run of `case`."""
    before = _resident_bytes(device)
    _reset_peak(device)
    sync(device)
    start = time.perf_counter()
    out = case()
    sync(device)
    tokens, seconds = out if isinstance(out, tuple) else (out, time.perf_counter() - start)
    return tokens / seconds, max(0, _peak_bytes(device) - before)


def _shortcut_fusion(width: int, hidden: int, tokens: int, repeats: int, device: str) -> dict:
    """Is `x Sᵀ + h Wᵀ` (a shortcut and a writer into one add) faster as one GEMM on concatenated operands?"""
    x, h = torch.randn(tokens, width, device=device), torch.randn(tokens, hidden, device=device)
    s, w = torch.randn(width, width, device=device), torch.randn(width, hidden, device=device)
    sw = torch.cat([s, w], 1)
    ways = {"separate": lambda: torch.nn.functional.linear(x, s) + torch.nn.functional.linear(h, w),
            "fused_with_cat": lambda: torch.nn.functional.linear(torch.cat([x, h], 1), sw)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(repeats + 1):
        for name, fn in ways.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    sep, fused = (statistics.median(times[k][1:]) for k in ways)
    return {"shape": f"{tokens} tokens, shortcut {width}x{width}, writer {width}x{hidden}",
            "separate_ms": round(sep * 1e3, 3), "fused_ms": round(fused * 1e3, 3), "fused_over_separate": round(fused / sep, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", default="0.25,0.5")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--multiple", type=int, default=8)
    parser.add_argument("--prune", default="0.166", help="also prune with the Surgeon at these targets ('' for none)")
    parser.add_argument("--shared-basis", default="", help="also slice at these sparsities with one basis per block")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefill", default="1x512,8x512,1x2048", help="batch x length, comma-separated")
    parser.add_argument("--decode", default="1,8", help="batch sizes for decoding")
    parser.add_argument("--compile", action="store_true", help="also decode through the compiled step, and time "
                        "transformers' generate() on the dense model")
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--calib-length", type=int, default=512)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    # loaded and captured in the dtype, so that the model's own float32 islands (norms, rotary) stay as transformers
    # runs them; every model is sliced or pruned in it
    module, tokenizer = load_model("smollm2", dtype=dtype)
    calib = token_windows(tokenizer, load_text("wikitext2:validation"), args.calib_length, count=args.calib_windows, seed=0)
    dense, dense_cached = capture_module(module), capture_cached(module)
    for program in (dense, dense_cached):  # the same clean-up and attention rewrite the sliced models get
        Recipe((Cleanup(), FuseGQA())).run(program)
    models: dict[str, tuple[Program, Program]] = {"dense": (dense, dense_cached)}
    widths: dict[str, list[int]] = {"dense": [576]}
    plans = [(float(x), False) for x in args.sparsities.split(",")]
    plans += [(float(x), True) for x in args.shared_basis.split(",") if x]
    for sparsity, shared in plans:
        program, cached = dense.clone(), dense_cached.clone()
        result = slicegpt(program, calib, constant_widths(sparsity, multiple=args.multiple), batch_size=4,
                          share=per_block if shared else None)
        replay(result.passes, cached, program)
        name = f"{'shared' if shared else 'sliced'}_{sparsity:g}"
        models[name] = (program, cached)
        widths[name] = sorted({r.kept for r in result.segments})
    for target in (float(x) for x in args.prune.split(",") if x):
        program, cached = capture_module(module), capture_cached(module)
        result = prune_recipe(target=target, shots=2, batch_size=4).run(program, calibration=calib[:4, :256])
        replay(result.passes, cached, program)  # clean-up, the Surgeon's weights and removals, GQA fusion
        name = f"pruned_{target:g}"
        models[name] = (program, cached)
        widths[name] = [576]
    for name, (program, cached) in list(models.items()):
        models[name] = (program.to(args.device), cached.to(args.device))

    prefill = [tuple(int(x) for x in spec.split("x")) for spec in args.prefill.split(",")]
    decode = [int(b) for b in args.decode.split(",")]
    cases = {f"prefill_{b}x{n}": (lambda m, b=b, n=n: prefill_run(m[0], b, n, args.device)) for b, n in prefill}
    cases |= {f"decode_{b}x128": (lambda m, b=b: decode_run(m[1], b, args.device)) for b in decode}
    if args.compile:
        cases |= {f"decode_compiled_{b}x128": (lambda m, b=b: decode_run(m[1], b, args.device, compiled=True))
                  for b in decode}
    runs = {(model, case): make(models[model]) for model in models for case, make in cases.items()}
    if args.compile:  # the dense model's own generate(), interleaved with the same decode cases
        module = module.to(args.device)
        runs |= {("hf_generate", f"decode_{b}x128"): _hf_generate(module, b, args.device) for b in decode}
    samples: dict[tuple[str, str], list[tuple[float, int]]] = {key: [] for key in runs}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # round 0 warms up (and compiles)
            for key in sorted(runs, key=lambda k: k[1]):  # case by case, every model in turn
                measured = _time(runs[key], args.device)
                if rep:
                    samples[key].append(measured)

    flops = {}
    for model, (program, cached) in models.items():
        flops[model] = {f"prefill_{b}x{n}": count_flops(program, b, n).total for b, n in prefill}
        flops[model] |= {f"decode_{b}x128": count_flops(cached, b, 1).total for b in decode}
    results = {}
    for model, (program, cached) in models.items():
        row = {"widths": widths[model], "parameters": program.num_parameters(),
               "decode_graph_ops": sum(n.op == "call_function" for n in cached.graph.nodes),
               "weight_mib": round(sum(p.numel() * p.element_size() for p in program.gm.parameters()) / 2**20, 1)}
        for case in cases:
            speed = statistics.median(s for s, _ in samples[(model, case)])
            shape = case.replace("compiled_", "")
            row[case] = {"tokens_per_s": round(speed, 1),
                         "peak_added_mib": round(max(m for _, m in samples[(model, case)]) / 2**20, 1),
                         "gflops_per_token": round(flops[model][shape] / 2**30 / _tokens(case), 4)}
            if ("hf_generate", shape) in samples:
                hf = statistics.median(s for s, _ in samples[("hf_generate", shape)])
                row[case]["over_hf_generate"] = round(speed / hf, 3)
            if model != "dense":
                dense_speed = statistics.median(s for s, _ in samples[("dense", case)])
                ideal = flops["dense"][shape] / flops[model][shape]
                row[case] |= {"speedup": round(speed / dense_speed, 3), "ideal_speedup": round(ideal, 3),
                              "efficiency": round(speed / dense_speed / ideal, 3)}
        results[model] = row
    if args.compile:
        results["hf_generate"] = {case: {"tokens_per_s": round(statistics.median(s for s, _ in samples[key]), 1)}
                                  for key in samples if key[0] == "hf_generate" for case in [key[1]]}
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct", "device": args.device, "dtype": args.dtype,
        "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "width_multiple": args.multiple,
        "results": results,
        "shortcut_fusion": _shortcut_fusion(432, 1536, 4096, 20, args.device),
    }, indent=1))


def _tokens(case: str) -> int:
    kind, shape = case.split("_")[0], case.rsplit("_", 1)[1]
    batch, length = (int(x) for x in shape.split("x"))
    return batch * (length if kind == "prefill" else 1)


if __name__ == "__main__":
    main()
