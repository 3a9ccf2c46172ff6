"""Everything the CPU cannot measure, in one command for the day a GPU is lent; one JSON file and a short table.

    python benchmarks/gpu_suite.py [--device cuda] [--dtype bfloat16] [--small] [--out gpu-suite.json]
                                   [--eval-windows 8] [--sizes 1b,8b] [--budget-s 540]

Sections, each timed and recorded whole or with its error (one failing section does not stop the others):

- `correctness`: SmolLM2 (`--small`: a tiny Llama) captured in `--dtype` on the device, sliced 25 %, pruned 20 %,
  quantized (4-bit, groups of 32; int4 kernels where the device takes them), recovered for 2 steps; saved, loaded,
  generated from; exported as pt2 and hf (stock Llama where it is one) and run; perplexity on the device against the
  CPU float32 figure on the same windows.
- `calibration`: SliceGPT and the Surgeon on the device and on the CPU, the same windows, seconds per layer and ratio;
  peak device memory; the Surgeon again with `--offload` under a memory cap (CUDA: a fraction of the card).
- `inference`: prefill (1x2048, 16x2048, 64x2048; `--small`: 1x64, 4x64) and greedy decoding (batch 1 and 16) of the
  dense and pruned models, tokens/s and the fraction of the matmul peak the device reaches (the FLOP ideal: a measured
  square bf16 matmul), the compiled step against transformers' `generate()`.
- `shapes`: random-weight Llamas of real shapes (`--sizes`: 1b, 8b) in `--dtype`, captured on the device: capture
  seconds and a 1x2048 prefill against the matmul peak (`--small`: a 2-layer model of width 256).

`--budget-s` stops starting new sections once that many seconds have passed, so the call fits a 10-minute lease.
On the CPU with `--small` it runs end to end in about a minute (tested in CI), so that a GPU costs one call.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import decode_run, prefill_run, sync  # noqa: E402 - the same timing loops as the speed benchmark

from fxslice import PassManager  # noqa: E402
from fxslice.data import load_text, token_windows  # noqa: E402
from fxslice.evaluation.generate import generate  # noqa: E402
from fxslice.evaluation.perplexity import perplexity  # noqa: E402
from fxslice.models.capture import capture_module, load_model  # noqa: E402
from fxslice.models.export import export_hf, export_pt2  # noqa: E402
from fxslice.models.io import load, save  # noqa: E402
from fxslice.models.kvcache import capture_cached  # noqa: E402
from fxslice.passes import CleanupIR, prune_recipe, slicegpt_recipe  # noqa: E402
from fxslice.passes.quantize import Int4Kernels, QuantizeWeights  # noqa: E402
from fxslice.passes.recovery.stages import Recover  # noqa: E402
from fxslice.recipes import Recipe  # noqa: E402
from fxslice.testing import char_tokenizer, tiny_causal_lm  # noqa: E402

SIZES = {  # hidden, intermediate, layers, heads, kv heads (Llama-3.2-1B and Llama-3.1-8B shapes)
    "1b": (2048, 8192, 16, 32, 8), "8b": (4096, 14336, 32, 32, 8), "small": (256, 512, 2, 8, 2)}


def _model(small: bool, dtype: torch.dtype):
    """(module, tokenizer, calibration windows, evaluation windows) of SmolLM2 or, with `small`, a tiny Llama."""
    if small:
        module = tiny_causal_lm("llama").to(dtype)
        tokenizer = char_tokenizer()
        ids = torch.randint(0, 96, (12, 64), generator=torch.Generator().manual_seed(0))
        return module, tokenizer, ids[:4], ids[4:]
    module, tokenizer = load_model("smollm2", dtype=dtype)
    calibration = token_windows(tokenizer, load_text("wikitext2:validation"), 512, count=8, seed=0)
    return module, tokenizer, calibration, token_windows(tokenizer, load_text("wikitext2:test"), 2048)


def _timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def correctness(args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict:
    module, tokenizer, calibration, test = _model(args.small, dtype)
    test = test[: args.eval_windows]
    out: dict = {}
    program, out["capture_s"] = _timed(lambda: capture_module(module).to(device), device)
    program.tokenizer = tokenizer
    PassManager([CleanupIR()]).run(program)
    reference = capture_module(_model(args.small, torch.float32)[0])
    out["perplexity_device"] = perplexity(program, test)
    out["perplexity_cpu_float32"] = perplexity(reference, test)
    out["perplexity_ratio"] = out["perplexity_device"] / out["perplexity_cpu_float32"]
    sliced = program.clone()
    _, out["slice_s"] = _timed(lambda: slicegpt_recipe(sparsity=0.25).run(sliced, calibration=calibration), device)
    out["sliced_perplexity"] = perplexity(sliced, test)
    pruned = program.clone()
    _, out["prune_s"] = _timed(lambda: prune_recipe(target=0.2, shots=1, multiple=32 if not args.small else 1).run(
        pruned, calibration=calibration), device)
    out["pruned_perplexity"] = perplexity(pruned, test)
    Recipe((Recover(steps=2, length=min(64 if args.small else 512, calibration.shape[1]), held_out=1,
                    text="wikitext2:validation"),)).run(pruned, calibration=calibration)
    quantized = pruned.clone()
    PassManager([QuantizeWeights(4, group_size=32)]).run(quantized)
    out["quantized_perplexity"] = perplexity(quantized, test)
    try:
        kernels = quantized.clone()
        PassManager([Int4Kernels()]).run(kernels)
        out["int4_kernels_perplexity"] = perplexity(kernels, test)
    except Exception as exc:  # noqa: BLE001 - the kernels refuse devices and dtypes they cannot run, by name
        out["int4_kernels"] = f"refused: {str(exc).splitlines()[0]}"
    with tempfile.TemporaryDirectory() as tmp:
        root = save(quantized, Path(tmp) / "model")
        loaded = load(root).to(device)
        ids = test[:1, :16].to(device)
        out["generate_equal_after_load"] = bool(torch.equal(generate(quantized, ids, max_new_tokens=8),
                                                            generate(loaded, ids, max_new_tokens=8)))
        export_pt2(loaded.to("cpu"), Path(tmp) / "m.pt2")
        archive = torch.export.load(str(Path(tmp) / "m.pt2")).module()
        out["pt2_runs"] = tuple(archive(ids.cpu()).shape) == (1, 16, loaded.vocab_size)
        written = export_hf(loaded.to("cpu"), Path(tmp) / "hf")
        out["hf"] = "stock Llama" if written.remote_code is None else f"remote code ({written.remote_code[-80:]})"
    return out


def calibration(args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict:
    module, _, windows, _ = _model(args.small, dtype)
    layers = module.config.num_hidden_layers
    out: dict = {}
    for where in dict.fromkeys([device, "cpu"]):
        program = capture_module(module).to(where)
        if where == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _, seconds = _timed(lambda p=program: slicegpt_recipe(sparsity=0.25).run(p, calibration=windows), where)
        out[f"slicegpt_s_per_layer_{where}"] = seconds / layers
        program = capture_module(module).to(where)
        _, seconds = _timed(lambda p=program: prune_recipe(target=0.2, shots=1).run(p, calibration=windows), where)
        out[f"surgeon_s_per_layer_{where}"] = seconds / layers
        if where == "cuda":
            out["peak_device_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if device != "cpu":
        out["slicegpt_speedup"] = out["slicegpt_s_per_layer_cpu"] / out[f"slicegpt_s_per_layer_{device}"]
        out["surgeon_speedup"] = out["surgeon_s_per_layer_cpu"] / out[f"surgeon_s_per_layer_{device}"]
    offloaded = capture_module(module).offload(device)
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(0.05)
    try:
        _, out["surgeon_offload_s"] = _timed(lambda: prune_recipe(target=0.2, shots=1).run(offloaded, calibration=windows),
                                             device)
    finally:
        if device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def _matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of a square matmul: the ideal a model's prefill is held to."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _, seconds = _timed(lambda: [a @ b for _ in range(5)], device)
    return 5 * 2 * n**3 / seconds


def inference(args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict:
    module, _, windows, _ = _model(args.small, dtype)
    dense = capture_cached(module).to(device)
    plain = capture_module(module).to(device)
    result = prune_recipe(target=0.2, shots=1, multiple=1 if args.small else 32).run(plain, calibration=windows)
    from fxslice.core.pass_manager import replay

    pruned = capture_cached(module).to(device)
    replay(result.passes, pruned, plain)
    peak = _matmul_peak(device, dtype, 256 if args.small else 4096)
    out: dict = {"matmul_peak_tflops": peak / 1e12}
    shapes = [(1, 64), (4, 64)] if args.small else [(1, 2048), (16, 2048), (64, 2048)]
    for name, program in (("dense", dense), ("pruned", pruned)):
        flops_per_token = 2 * program.num_parameters()
        for batch, length in shapes:
            run = prefill_run(program, batch, length, device)
            with torch.no_grad():
                run()
                _, seconds = _timed(run, device)
            out[f"{name}_prefill_{batch}x{length}_tokens_per_s"] = batch * length / seconds
            out[f"{name}_prefill_{batch}x{length}_of_peak"] = flops_per_token * batch * length / seconds / peak
        for batch in (1, 16):
            for compiled in (False, True) if device == "cuda" else (False,):
                run = decode_run(program, batch, device, prompt=16, new=16 if args.small else 128, compiled=compiled)
                with torch.no_grad():
                    run()
                    tokens, seconds = run()
                out[f"{name}_decode_b{batch}{'_compiled' if compiled else ''}_tokens_per_s"] = tokens / seconds
    return out


def shapes(args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict:
    import transformers

    out: dict = {}
    peak = _matmul_peak(device, dtype, 256 if args.small else 4096)
    for size in ["small"] if args.small else args.sizes.split(","):
        hidden, intermediate, layers, heads, kv_heads = SIZES[size]
        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=32000
                                          if args.small else 128256, max_position_embeddings=4096)
        with torch.device(device):
            module = transformers.LlamaForCausalLM(config).to(dtype)
        program, seconds = _timed(lambda m=module: capture_module(m), device)
        length = 64 if args.small else 2048
        run = prefill_run(program, 1, length, device)
        with torch.no_grad():
            run()
            _, prefill = _timed(run, device)
        out[size] = {"parameters": program.num_parameters(), "capture_s": seconds, "prefill_tokens_per_s": length / prefill,
                     "prefill_of_peak": 2 * program.num_parameters() * length / prefill / peak}
        del module, program
    return out


SECTIONS = {"correctness": correctness, "calibration": calibration, "inference": inference, "shapes": shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--small", action="store_true", help="tiny shapes: the whole suite in about a minute")
    parser.add_argument("--out", default="gpu-suite.json")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--sizes", default="1b,8b")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--budget-s", type=float, default=540.0)
    args = parser.parse_args()
    device = torch.device(args.device).type
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    start = time.perf_counter()
    report: dict = {"device": args.device, "card": torch.cuda.get_device_name() if device == "cuda" else
                    platform.processor() or platform.machine(), "dtype": str(dtype).removeprefix("torch."),
                    "small": args.small, "torch": torch.__version__, "sections": {}}
    for name in args.sections.split(","):
        if time.perf_counter() - start > args.budget_s:
            report["sections"][name] = {"skipped": f"the budget of {args.budget_s:.0f} s was spent"}
            continue
        began = time.perf_counter()
        try:
            figures = SECTIONS[name](args, device, dtype)
            report["sections"][name] = {"seconds": round(time.perf_counter() - began, 1), **figures}
        except Exception as exc:  # noqa: BLE001 - a section's failure is a finding, recorded, not the end of the run
            report["sections"][name] = {"seconds": round(time.perf_counter() - began, 1), "error": repr(exc),
                                        "trace": traceback.format_exc().splitlines()[-6:]}
        print(f"{name}: {json.dumps(report['sections'][name], default=str)[:400]}", file=sys.stderr, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    for name, figures in report["sections"].items():
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
                          if k not in ("trace",))
        print(f"{name:<12} {shown}")


if __name__ == "__main__":
    main()
