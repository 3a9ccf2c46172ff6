"""SmolLM2 compressed by fxslice and run by llama.cpp, against the dense model in llama.cpp and fxslice's own runtime,
in one run; one JSON object.

    python benchmarks/runtimes.py [--type q8_0] [--prune 0.166] [--multiple 32] [--shots 4] [--calib-windows 16]
                                  [--calib-length 512] [--slice 0.25 | --sliced DIR]
                                  [--pruned DIR] [--bits 4] [--grids zero_point,offset] [--eval-windows 8]
                                  [--eval-length 2048] [--prefill 512]
                                  [--new 128] [--threads 2] [--repeats 3] [--out DIR] [--only sliced,dense]

Models: the shipped Q4_1 file as llama.cpp's own dense baseline; the dense model and the Surgeon's model (`--prune`, or
a saved one with `--pruned DIR`) and SliceGPT with one basis for the whole stream (`--slice`, or a saved one with `--sliced DIR`: a narrower stock Llama)
exported at `--type` (the same type, so that the ratio is the compression's); each of them
quantized by fxslice (GPTQ, `--bits` in groups of 32 on each of `--grids`, tables 8-bit: exported as the Q4_1 / Q5_1
blocks of the same integers, Q4_0 / Q5_0 for a symmetric grid, tables Q8_0) and, for comparison at the same types, by
llama.cpp's own quantizer (`llama_model_quantize`
from the float32 export, no importance matrix, its own choice for the token table). Per GGUF file: its bytes, perplexity from llama.cpp's logits on the first `--eval-windows`
test windows (fxslice's windows: the same tokens; `all`: the whole split), prefill of `--prefill` tokens and batch-1 greedy decoding of `--new`
tokens (tokens/s, medians over `--repeats` after a warm-up); and fxslice's own runtime (the captured program with its
KV cache, float32) on the same cases. Ratios are against the dense export at `--type`. `--only` measures the named
results alone (`sliced` in llama.cpp, `fxslice_sliced` in fxslice; no ratios without `dense`), e.g. one model's whole
split.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import decode_run, prefill_run  # noqa: E402 - fxslice's own timing loops

from fxslice import PassManager, compress  # noqa: E402
from fxslice.core.progress import progress_bar  # noqa: E402
from fxslice.data import load_text, token_windows  # noqa: E402
from fxslice.evaluation.perplexity import perplexity  # noqa: E402
from fxslice.models.capture import default_model_path, load_model  # noqa: E402
from fxslice.models.gguf_export import export_gguf  # noqa: E402
from fxslice.models.io import load  # noqa: E402
from fxslice.models.kvcache import capture_cached  # noqa: E402
from fxslice.passes import CleanupIR, prune_recipe, slicegpt_recipe  # noqa: E402
from fxslice.passes.quantize import QuantizeWeights  # noqa: E402
from fxslice.recipes import Calibration  # noqa: E402


def _llama(path: Path, threads: int, context: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=min(context, 512), logits_all=True,
                           verbose=False, n_threads=threads, n_threads_batch=threads)


def _llama_cpp_perplexity(model, windows: torch.Tensor, name: str) -> float:
    """exp(mean next-token loss) from llama.cpp's logits, window by window (a fresh context for each)."""
    total, count = 0.0, 0
    for window in progress_bar(windows.tolist(), f"perplexity of {name} in llama.cpp"):
        model.reset()
        model.eval(window)
        logits = np.asarray(model.scores[: len(window) - 1], dtype=np.float64)
        top = logits.max(-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        total += float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    return float(np.exp(total / count))


def _llama_cpp_speeds(model, prompt: list[int], prefill: int, new: int) -> tuple[float, float]:
    """(prefill tokens/s of `prefill` tokens, greedy decoding tokens/s of `new` tokens after a short prompt)."""
    model.reset()
    start = time.perf_counter()
    model.eval(prompt[:prefill])
    prefill_speed = prefill / (time.perf_counter() - start)
    model.reset()
    model.eval(prompt[:16])
    start = time.perf_counter()
    for _ in range(new):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        model.eval([token])
    return prefill_speed, new / (time.perf_counter() - start)


def _decodable(report, what: str):
    """The KV-cache program of a compress() report, which fxslice's own decoding needs."""
    if report.cached is None:
        raise SystemExit(f"the {what} model has no KV-cache capture to decode with: " + "; ".join(report.notes))
    return report.cached


def _programs(args: argparse.Namespace, tokenizer, module, measured) -> dict[str, object]:
    """The fxslice programs to export, by name (KV-cache captures, so that fxslice's own decoding uses the cache);
    a quantized one only where `measured(name)` asks for it (GPTQ takes minutes)."""
    dense = capture_cached(module)
    dense.tokenizer, dense.source = tokenizer, "smollm2"
    PassManager([CleanupIR()]).run(dense)
    programs = {"dense": dense}
    if args.pruned:
        programs["pruned"] = load(args.pruned)
    elif args.prune:
        out = Path(args.out) / "pruned-model" if args.out else None  # to reuse with --pruned
        calibration = Calibration(windows=args.calib_windows, length=args.calib_length)
        recipe = prune_recipe(target=args.prune, shots=args.shots, multiple=args.multiple, calibration=calibration)
        programs["pruned"] = _decodable(compress("smollm2", recipe, out=None if out is None or out.exists() else out,
                                                 evaluation=None), "pruned")
    if args.sliced:
        programs["sliced"] = load(args.sliced)
    elif args.slice:
        calibration = Calibration(windows=args.calib_windows, length=args.calib_length)
        recipe = slicegpt_recipe(sparsity=args.slice, multiple=args.multiple, shared_basis="stream",
                                 calibration=calibration)
        programs["sliced"] = _decodable(compress("smollm2", recipe, out=None, evaluation=None), "sliced")
    if args.bits:
        calibration = token_windows(tokenizer, load_text("wikitext2:validation"), args.calib_length,
                                    count=args.calib_windows, seed=0)
        for name in list(programs):
            for grid in args.grids.split(","):
                if not measured(f"{name}+gptq{args.bits}-{grid}"):
                    continue
                quantized = programs[name].clone()
                PassManager([QuantizeWeights(args.bits, group_size=32, method="gptq", windows=calibration, embeddings=8,
                                             head=8, grid=grid)]).run(quantized)
                programs[f"{name}+gptq{args.bits}-{grid}"] = quantized
    return programs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--type", default="q8_0", help="GGUF type of the float exports")
    parser.add_argument("--prune", type=float, default=0.166)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--calib-length", type=int, default=512)
    parser.add_argument("--multiple", type=int, default=32, help="MLP widths kept at multiples of this (GGUF blocks)")
    parser.add_argument("--pruned", default="", help="a saved pruned model instead of pruning here")
    parser.add_argument("--slice", type=float, default=0.0, help="also SliceGPT at this sparsity, one basis for the "
                        "stream (widths at --multiple)")
    parser.add_argument("--sliced", default="", help="a saved model sliced with one basis for the stream, instead")
    parser.add_argument("--bits", type=int, default=4, help="fxslice's GPTQ width (4 or 5; 0: none)")
    parser.add_argument("--grids", default="zero_point,offset",
                        help="fxslice's GPTQ grids, comma-separated: zero_point (integer), offset (Q4_1's own), "
                        "symmetric (Q4_0's)")
    parser.add_argument("--eval-windows", default="8", help="first N test windows, or 'all' (0: no perplexity)")
    parser.add_argument("--eval-length", type=int, default=2048)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="", help="keep the GGUF files here (default: a temporary folder)")
    parser.add_argument("--only", default="", help="measure only these models (comma-separated names of the results)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = Path(args.out or tempfile.mkdtemp(prefix="fxslice-runtimes-"))
    folder.mkdir(parents=True, exist_ok=True)  # before the models: the pruned one is saved into it
    module, tokenizer = load_model("smollm2")
    only = set(args.only.split(",")) if args.only else None

    def measured(name: str) -> bool:
        return only is None or name in only

    programs = _programs(args, tokenizer, module, measured)

    files = {"shipped_q4_1": default_model_path()}
    exports = {}
    for name, program in programs.items():
        if not measured(name):
            continue
        path = folder / f"{name}.gguf"
        path.unlink(missing_ok=True)
        report = export_gguf(program, path, weight_type=args.type)
        files[name] = path
        exports[name] = {"architecture": report.architecture, "types": dict(report.types),
                         "parameters": program.num_parameters()}

    if args.bits in (4, 5):  # llama.cpp's own quantization of the same float weights to the same block types
        import llama_cpp

        kinds = {f"q{args.bits}_0" if g == "symmetric" else f"q{args.bits}_1" for g in args.grids.split(",")}
        for name in [n for n in programs if "+" not in n
                     and any(measured(f"{n}+llama.cpp-{kind}") for kind in kinds)]:
            source = folder / f"{name}.f32.gguf"
            source.unlink(missing_ok=True)
            export_gguf(programs[name], source, weight_type="f32")
            for kind in sorted(kinds):
                target = folder / f"{name}+llama.cpp-{kind}.gguf"
                if not measured(target.stem):
                    continue
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}"), args.threads
                if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
                    raise RuntimeError(f"llama_model_quantize failed on {source}")
                files[target.stem] = target
                exports[target.stem] = {"parameters": programs[name].num_parameters()}
            source.unlink()

    test = token_windows(tokenizer, load_text("wikitext2:test"), args.eval_length)
    windows = test if args.eval_windows == "all" else test[: int(args.eval_windows)]
    prompt = test[0].tolist()  # the speed runs' text, also without a perplexity
    rows: dict[str, dict] = {}
    files = {name: path for name, path in files.items() if measured(name)}
    for name, path in files.items():
        model = _llama(path, args.threads, max(args.eval_length, args.prefill + 16, 16 + args.new + 1))
        _llama_cpp_speeds(model, prompt, args.prefill, 8)  # warm-up
        speeds = [_llama_cpp_speeds(model, prompt, args.prefill, args.new) for _ in range(args.repeats)]
        rows[name] = {"runtime": "llama.cpp", "file_mb": round(path.stat().st_size / 1e6, 2),
                      "perplexity": round(_llama_cpp_perplexity(model, windows, name), 3) if len(windows) else None,
                      "prefill_tokens_per_s": round(statistics.median(s[0] for s in speeds), 1),
                      "decode_tokens_per_s": round(statistics.median(s[1] for s in speeds), 1),
                      **exports.get(name, {})}
        model.close()
    with torch.no_grad():
        for name, program in programs.items():
            if "+" in name or not measured(f"fxslice_{name}"):
                continue  # fxslice computes quantized programs dequantized: their speed is the float model's
            prefill = prefill_run(program, 1, args.prefill, "cpu")
            decode = decode_run(program, 1, "cpu", new=args.new)
            prefill(), decode()  # warm-up
            samples = [(args.prefill / _seconds(prefill), _tokens_per_s(decode)) for _ in range(args.repeats)]
            rows[f"fxslice_{name}"] = {
                "runtime": "fxslice (captured, float32, KV cache)",
                "perplexity": round(perplexity(program, windows), 3) if len(windows) else None,
                "prefill_tokens_per_s": round(statistics.median(s[0] for s in samples), 1),
                "decode_tokens_per_s": round(statistics.median(s[1] for s in samples), 1)}
    reference = rows.get("dense", {})
    for row in rows.values():
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "file_mb", "perplexity"):
            if row.get(key) and reference.get(key):
                row[f"{key.removesuffix('_tokens_per_s')}_vs_dense"] = round(row[key] / reference[key], 3)
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct", "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "torch": torch.__version__, "llama_cpp_python": _version("llama-cpp-python"), "type": args.type,
        "prune": None if args.pruned else args.prune, "pruned_dir": args.pruned or None, "bits": args.bits,
        "grids": args.grids.split(","),
        "calibration": {"windows": args.calib_windows, "length": args.calib_length, "shots": args.shots},
        "slice": None if args.sliced else args.slice or None, "sliced_dir": args.sliced or None, "eval": {"windows": len(windows), "length": args.eval_length}, "prefill": args.prefill, "new": args.new,
        "repeats": args.repeats, "reference": "dense", "results": rows}, indent=1))


def _seconds(case) -> float:
    start = time.perf_counter()
    out = case()
    return out[1] if isinstance(out, tuple) else time.perf_counter() - start


def _tokens_per_s(case) -> float:
    start = time.perf_counter()
    out = case()
    tokens, seconds = out if isinstance(out, tuple) else (out, time.perf_counter() - start)
    return tokens / seconds


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
