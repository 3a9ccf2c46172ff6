"""How time and host memory grow with the model: random-weight Llama models of real shapes, sliced, pruned and
quantized on this machine, one process per run; one JSON object (and a log-log picture).

    python benchmarks/scale.py [--shapes 135M 360M 1.7B] [--methods slice prune quantize capture]
                               [--calib-windows 2] [--calib-length 256] [--proofs float64|dtype]
                               [--lazy] [--save] [--work DIR] [--picture PATH]

Each shape is written once by this script as bf16 safetensors in shards of 2 GB (as hub checkpoints are) with a
`config.json` and SmolLM2's tokenizer (so every shape reads the same text; the vocabulary is SmolLM2's 49,152
tokens). Each (shape, method) runs `fxslice.compress` in a fresh process (float32, no evaluation, the calibration
given above: quality is not the point) and reports its capture, per-stage and save seconds and its peak resident
memory (`ru_maxrss`). The summary fits log(time) and log(peak) against log(parameters) per method and extrapolates
to 7 B and 70 B; shapes whose float32 weights would not fit in this machine's memory are skipped and said so.
`capture` times `fxslice.capture` alone (the model loaded by transformers, then traced), the floor of every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

#: Llama-family shapes (hidden, layers, MLP width, heads, key/value heads) of published models
SHAPES = {
    "135M": (576, 30, 1536, 9, 3),  # SmolLM2-135M
    "360M": (960, 32, 2560, 15, 5),  # SmolLM2-360M
    "1.7B": (2048, 24, 8192, 32, 32),  # SmolLM2-1.7B
    "7B": (4096, 32, 11008, 32, 32),  # Llama-2-7B's layers (SmolLM2's vocabulary)
}
VOCAB = 49152
SHARD_BYTES = 2 * 10**9


def write_model(name: str, folder: Path, tokenizer) -> Path:
    """A random-weight bf16 Llama of shape `name` as sharded safetensors, written tensor by tensor (never whole)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    out = folder / name
    if (out / "model.safetensors.index.json").is_file():
        return out
    hidden, layers, ffn, heads, kv = SHAPES[name]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                         tie_word_embeddings=name in ("135M", "360M", "1.7B"), rope_theta=100000.0,
                         torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    files: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        save_file(shard, str(out / f"shard-{len(files)}.safetensors"), metadata={"format": "pt"})
        files.append(list(shard))
        shard.clear()

    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) * (0.02 if "embed" in key else shape[-1] ** -0.5)
        value = value.to(torch.bfloat16)
        if shard and sum(t.nbytes for t in shard.values()) + value.nbytes > SHARD_BYTES:
            flush()
        shard[key] = value
    flush()
    weight_map = {}
    for i, keys in enumerate(files):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(out / f"shard-{i}.safetensors", out / name)
        weight_map |= dict.fromkeys(keys, name)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return out


def run_one(model: str, method: str, windows: int, length: int, proofs: str = "float64", lazy: bool = False,
            save_to: Path | None = None) -> dict:
    """One compression (or capture) in this process, saved to `save_to` when given: seconds per step and peak
    resident memory."""
    from fxslice import capture, compress
    from fxslice.models.lazy import capture_lazily
    from fxslice.passes import prune_recipe, slicegpt_recipe
    from fxslice.passes.quantize.stages import Quantize
    from fxslice.passes.rewrite.stages import Cleanup
    from fxslice.recipes import Calibration, Recipe

    if method == "capture":
        start = time.perf_counter()
        program = capture_lazily(model)[0] if lazy else capture(model)
        total = time.perf_counter() - start
        return {"seconds": {"capture": round(total, 2)}, "total_seconds": round(total, 1),
                "parameters": program.num_parameters(), "parameters_after": program.num_parameters(),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    calibration = Calibration(windows=windows, length=length)
    recipe = {
        "slice": lambda: slicegpt_recipe(calibration=calibration, sparsity=0.25),
        "prune": lambda: prune_recipe(calibration=calibration, target=0.2, shots=1),
        "quantize": lambda: Recipe((Cleanup(), Quantize(bits=4, method="gptq")), calibration, name="gptq4"),
    }[method]()
    start = time.perf_counter()
    report = compress(model, recipe, out=save_to, evaluation=None, progress=False, proofs=proofs, lazy=lazy,
                      status=lambda message: _quiet(), note=lambda message: None)
    total = time.perf_counter() - start
    return {"seconds": {k: round(v, 2) for k, v in report.seconds.items()}, "total_seconds": round(total, 1),
            "parameters_after": report.result.parameters, "parameters": report.result.dense_parameters,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _quiet():
    import contextlib

    return contextlib.nullcontext()


def _fit(points: list[tuple[float, float]]) -> dict | None:
    """Least squares of log y on log x: y = c · x^slope."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return {"slope": round(slope, 3), "log_c": my - slope * mx}


def _at(fit: dict, x: float) -> float:
    return math.exp(fit["log_c"] + fit["slope"] * math.log(x))


def picture(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method and "error" not in r]
        xs = [r["parameters"] for r in mine]
        axes[0].loglog(xs, [r["total_seconds"] for r in mine], "o-", label=method)
        axes[1].loglog(xs, [r["peak_rss_bytes"] / 2**30 for r in mine], "o-", label=method)
    weights = sorted({r["parameters"] for r in runs if "parameters" in r})
    axes[1].loglog(weights, [4 * p / 2**30 for p in weights], "k--", label="float32 weights")
    axes[0].set(xlabel="parameters", ylabel="seconds (capture to compressed)", title="time")
    axes[1].set(xlabel="parameters", ylabel="peak resident memory (GiB)", title="host memory")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"fxslice on random-weight Llama shapes, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["135M", "360M", "1.7B"], choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["slice", "prune", "quantize"],
                        choices=["slice", "prune", "quantize", "capture"])
    parser.add_argument("--proofs", default="float64", choices=["float64", "dtype"],
                        help="how exact passes are checked (compress's option): dtype skips the float64 copy")
    parser.add_argument("--lazy", action="store_true", help="weights left in the checkpoint's files (compress's lazy)")
    parser.add_argument("--save", action="store_true", help="save each compressed model (a scratch folder under "
                        "--work, removed after the run): its seconds are `save`")
    parser.add_argument("--calib-windows", type=int, default=2)
    parser.add_argument("--calib-length", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "fxslice-scale")
    parser.add_argument("--picture", default=str(Path(__file__).resolve().parents[1] / "docs/images/scale.png"),
                        help="where to draw the log-log picture ('' for none)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        save_to = None
        if args.save:
            import tempfile

            save_to = Path(tempfile.mkdtemp(dir=args.work)) / "out"
        try:
            print(json.dumps(run_one(args.one[0], args.one[1], args.calib_windows, args.calib_length, args.proofs,
                                     args.lazy, save_to)))
        finally:
            if save_to is not None:
                shutil.rmtree(save_to.parent, ignore_errors=True)
        return
    from fxslice.models.capture import load_model

    _, tokenizer = load_model("smollm2")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    runs = []
    for shape in args.shapes:
        hidden, layers, ffn, heads, kv = SHAPES[shape]
        print(f"[scale] writing {shape} ...", file=sys.stderr, flush=True)
        folder = write_model(shape, args.work, tokenizer)
        for method in args.methods:
            entry = {"shape": shape, "method": method}
            files = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            if 2 * files > 0.8 * memory and not args.lazy:  # float32 is twice the bf16 files
                runs.append({**entry, "skipped": f"float32 weights {2 * files / 2**30:.1f} GiB exceed 80 % of "
                                                 f"this machine's {memory / 2**30:.0f} GiB"})
                continue
            print(f"[scale] {shape} {method} ...", file=sys.stderr, flush=True)
            child = subprocess.run([sys.executable, __file__, "--one", str(folder), method, "--calib-windows",
                                    str(args.calib_windows), "--calib-length", str(args.calib_length), "--proofs", args.proofs,
                                    "--work", str(args.work), *(["--lazy"] if args.lazy else []),
                                    *(["--save"] if args.save else [])],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                runs.append({**entry, "error": child.stderr.strip().splitlines()[-1:]})
                continue
            result = json.loads(child.stdout.strip().splitlines()[-1])
            result["peak_over_float32_weights"] = round(result["peak_rss_bytes"] / (2 * files), 2)
            runs.append({**entry, "bf16_file_bytes": files, **result})
            print(f"[scale] {shape} {method}: {result['total_seconds']} s, peak "
                  f"{result['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    fits = {}
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method and "peak_rss_bytes" in r]
        time_fit = _fit([(r["parameters"], r["total_seconds"]) for r in mine])
        rss_fit = _fit([(r["parameters"], r["peak_rss_bytes"]) for r in mine])
        if time_fit and rss_fit:
            fits[method] = {"time_slope": time_fit["slope"], "peak_rss_slope": rss_fit["slope"],
                            **{f"extrapolated_{n}": {"seconds": round(_at(time_fit, p)),
                                                     "peak_rss_gib": round(_at(rss_fit, p) / 2**30, 1)}
                               for n, p in (("7B", 6.7e9), ("70B", 70e9))}}
    drawn = None
    if args.picture and any("peak_rss_bytes" in r for r in runs):
        try:
            picture(runs, Path(args.picture))
            drawn = args.picture
        except ImportError as exc:  # the figures matter more than the picture: print them anyway
            print(f"[scale] no picture ({exc}; pip install matplotlib)", file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "scale", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
        "cores": os.cpu_count(), "memory_bytes": memory, "torch": torch.__version__,
        "calibration": {"windows": args.calib_windows, "length": args.calib_length}, "proofs": args.proofs,
        "lazy": args.lazy, "save": args.save, "runs": runs, "fits": fits, "picture": drawn,
    }, indent=1))


if __name__ == "__main__":
    main()
