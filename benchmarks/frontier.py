"""The quality frontier: perplexity against stored bytes and against real parameter count for every recipe
measured — quantized, pruned, sliced, their combinations, with and without recovery — as one PNG and one JSON.

    python benchmarks/frontier.py [--windows 148] [--out docs/images/frontier.png] [FILES...]

Reads the raw outputs of `quality.py`, `pruning.py` and `quantization.py` (and hand-kept figures with their
commands, for runs whose raw output was not saved) and draws every row evaluated on the same number of test windows
(148: the whole WikiText-2 test split) — so no point is compared with one measured on other text. Bytes are as
stored: a quantized model's packed integers, scales and float tensors (its row's `bytes`); a float model as fxslice
saves it, 4 bytes per parameter. The dense model, and on the whole split the official SliceGPT figures for SmolLM2
(untied head, 61.5 at 140.7 M and 80.6 at 131.6 M parameters), are drawn for reference.
Prints the points drawn and, per size (bytes, and parameters), which recipe is best.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

#: the official SliceGPT implementation on SmolLM2-135M, whole WikiText-2 test split (issue 14)
OFFICIAL = [(140_700_000, 61.5), (131_600_000, 80.6)]
#: rows above this perplexity (magnitude pruning's collapse) stay in the JSON but off the picture
CEILING = 1000.0
WHOLE_SPLIT = 148  # windows of 2048 tokens in WikiText-2 test
FLOAT32_BYTES = 4  # per parameter of a float model as fxslice saves it


def quality_points(data: dict) -> list[dict]:
    head = "untied" if data.get("head") == "untied" else "tie kept"
    points = []
    for row in data["results"]:
        if row["sparsity"] == "dense" or row.get("perplexity") is None or "note" in row:  # a note marks a superseded row
            continue
        refit, correction = row.get("refit"), row.get("head_correction")
        name = f"SliceGPT {row.get('allocation', 'constant')}, {head}" + (
            f", refit {refit.get('mode', 'readers')}" if isinstance(refit, dict) else "") + (
            ", head corrected" if isinstance(correction, dict) and correction.get("rank") else "")
        points.append({"recipe": name, "parameters": row["parameters"], "perplexity": row["perplexity"]})
    return points


def pruning_points(data: dict) -> list[dict]:
    points = []
    distilled = (data.get("recover") or {}).get("objective") == "distill"
    for row in data["results"]:
        masked = row.get("nonzero_parameters", row["parameters"]) < 0.99 * row["parameters"]  # zeros, not smaller
        if row["method"] == "dense" or masked:
            continue
        name = {"surgeon": "LLM Surgeon", "lobd": "L-OBD", "kobd": "K-OBD", "slicegpt": "SliceGPT constant, tie kept, "
                "calibrated like the Surgeon", "slicegpt+surgeon": "SliceGPT then Surgeon"}.get(row["method"], row["method"])
        if any(stage.get("head_rank") for stage in row.get("recipe") or ()):
            name = "SliceGPT constant, tie kept, head corrected"
        if row.get("perplexity") is not None:  # a recovery run may evaluate only its result
            points.append({"recipe": name, "parameters": row["parameters"], "perplexity": row["perplexity"]})
        if row.get("perplexity_recovered") is not None:
            recovery = "distilled from dense" if distilled else "recovery"
            points.append({"recipe": f"{name} + {recovery}", "parameters": row["recovered_parameters"],
                           "perplexity": row["perplexity_recovered"]})
    return points


def quantization_recipe(model: str, weights: str) -> str:
    """`quantization.py`'s base model ("surgeon 0.166 + hadamard") and weights ("gptq 4-bit + learned rotation") as
    the steps of a recipe, the sizes left out so that one recipe at several widths is one line:
    "Surgeon → Hadamard → GPTQ"."""
    names = {"surgeon": "Surgeon", "slicegpt": "SliceGPT", "hadamard": "Hadamard"}
    steps = [names.get(part.split()[0], part.split()[0]) for part in model.split(" + ") if part.split()[0] != "dense"]
    method = weights.split()[0]
    if "learned rotation" in weights:
        steps.append("learned rotation")
    steps.append(f"searched widths ({method})" if " search" in weights else method.upper())
    return " → ".join(steps)


def quantization_setting(row: dict, data: dict) -> str:
    """What a `quantization.py` row changed from the defaults (zero-point grid in groups of 64, the table tied at 8
    bits), as ", offset grid in groups of 32, table 4-bit"; "" for the defaults. Older raw files give the table's
    width once for the run (`embedding_bits`)."""
    text = ""
    grid, group = row.get("grid", "zero_point"), row.get("group_size", 64)
    if (grid, group) != ("zero_point", 64):
        text += f", {grid} grid in groups of {group}"
    if " search" not in row["weights"]:  # a search chooses the table's width itself
        bits = data.get("embedding_bits", 8)
        table = row.get("table", (f"{bits}-bit" if bits else "float") + ", tied")
        if table != "8-bit, tied":
            text += f", table {table.removesuffix(', tied')}"
    return text


def quantization_points(data: dict) -> list[dict]:
    """The quantized rows of `quantization.py` (its float rows repeat what the pruning and quality benchmarks
    measure), searches included."""
    points = []
    for row in [*data.get("results", []), *data.get("searches", [])]:
        if row.get("weights") == "float32" or row.get("perplexity") is None or row.get("bytes") is None:
            continue
        recipe = quantization_recipe(row["model"], row["weights"]) + quantization_setting(row, data)
        points.append({"recipe": recipe, "parameters": row["parameters"],
                       "bytes": row["bytes"], "perplexity": row["perplexity"]})
    return points


def dense_point(data: dict) -> dict | None:
    for row in data.get("results", []):
        if row.get("sparsity") == "dense" or row.get("method") == "dense" or (
                row.get("model") == "dense" and row.get("weights") == "float32"):
            if row.get("perplexity") is not None:
                return {"parameters": row["parameters"], "bytes": FLOAT32_BYTES * row["parameters"],
                        "perplexity": row["perplexity"]}
    return None


def collect(files: list[str], windows: int) -> tuple[list[dict], dict | None]:
    points, dense = [], None
    for file in files:
        data = json.loads(Path(file).read_text())
        if not isinstance(data, dict) or data.get("evaluation", {}).get("windows") != windows:
            continue
        rows = [r for r in data.get("results", []) if isinstance(r, dict)]
        if rows and all("recipe" in r and "perplexity" in r for r in rows):  # hand-kept figures
            found = [{k: r[k] for k in ("recipe", "parameters", "perplexity")} for r in rows]
        elif data.get("searches") or (rows and all("weights" in r and "model" in r for r in rows)):
            found = quantization_points(data)
        elif rows and all("method" in r for r in rows):
            found = pruning_points(data)
        elif rows and all("sparsity" in r for r in rows):
            found = quality_points(data)
        else:  # another benchmark's output (speed, runtimes): no perplexity per size
            continue
        for point in found:
            point["source"] = Path(file).name
            point.setdefault("bytes", FLOAT32_BYTES * point["parameters"])
        seen = {(p["recipe"], p["parameters"], round(p["perplexity"], 2)) for p in points}
        points += [p for p in found if (p["recipe"], p["parameters"], round(p["perplexity"], 2)) not in seen]
        dense = dense or dense_point(data)
    return points, dense


def best_by_size(points: list[dict], size: str = "parameters") -> list[dict]:
    """The frontier: each point no other point beats with as few or fewer `size` (parameters, or bytes)."""
    ordered = sorted(points, key=lambda p: (p[size], p["perplexity"]))
    frontier, best = [], float("inf")
    for point in ordered:
        if point["perplexity"] < best:
            frontier.append(point)
            best = point["perplexity"]
    return frontier


def draw(points: list[dict], dense: dict | None, out: str, windows: int) -> None:
    """Left: perplexity against stored MB; right: against parameters. One colour and marker per recipe in both."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_bytes, by_parameters) = plt.subplots(1, 2, figsize=(15, 5.6), sharey=True)
    points = [p for p in points if p["perplexity"] <= CEILING]
    colours = plt.get_cmap("tab20").colors
    for i, recipe in enumerate(sorted({p["recipe"] for p in points})):
        style = dict(marker="os^Dv<>p"[i % 8], color=colours[(2 * i) % 20 + (i // 10) % 2])
        for ax, size in ((by_bytes, "bytes"), (by_parameters, "parameters")):
            mine = sorted((p for p in points if p["recipe"] == recipe), key=lambda p: p[size])
            ax.plot([p[size] / 1e6 for p in mine], [p["perplexity"] for p in mine], "-",
                    label=recipe if ax is by_bytes else None, **style)
    for ax, size in ((by_bytes, "bytes"), (by_parameters, "parameters")):  # the front: what no smaller point beats
        front = best_by_size(points, size)
        ax.step([p[size] / 1e6 for p in front], [p["perplexity"] for p in front], where="post", color="black", lw=6,
                alpha=0.15, zorder=0, label="the front (no smaller point is better)" if ax is by_bytes else None)
    if windows == WHOLE_SPLIT:  # the official figures are whole-split ones (float32, untied head)
        by_parameters.plot([p / 1e6 for p, _ in OFFICIAL], [q for _, q in OFFICIAL], "s--", color="grey")
        by_bytes.plot([FLOAT32_BYTES * p / 1e6 for p, _ in OFFICIAL], [q for _, q in OFFICIAL], "s--", color="grey",
                      label="official SliceGPT (untied head)")
    if dense is not None:
        for ax, size in ((by_bytes, "bytes"), (by_parameters, "parameters")):
            ax.axhline(dense["perplexity"], color="black", lw=0.8, ls=":")
            ax.plot([dense[size] / 1e6], [dense["perplexity"]], "k*", ms=12, label="dense" if ax is by_bytes else None)
    by_bytes.set_xscale("log")
    by_bytes.set_xlabel("MB as stored (log; integers, scales and float tensors; float models 4 B per parameter)")
    by_parameters.set_xlabel("parameters (millions; shortcuts and untied heads counted)")
    by_bytes.set_ylabel("perplexity, WikiText-2 test (log)")
    by_bytes.set_yscale("log")
    by_bytes.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    by_bytes.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    by_bytes.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([25, 50, 75, 100, 150, 200, 300, 400, 600]))
    by_bytes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    by_bytes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in (by_bytes, by_parameters):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"SmolLM2-135M: quality per byte and per parameter ({windows} windows of 2048 tokens)")
    fig.tight_layout()
    fig.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(out, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="raw outputs (default: benchmarks/results/*.json)")
    parser.add_argument("--windows", type=int, default=WHOLE_SPLIT, help="test windows the rows must be evaluated on")
    parser.add_argument("--out", default="docs/images/frontier.png")
    args = parser.parse_args()
    files = args.files or sorted(glob.glob(str(Path(__file__).parent / "results" / "*.json")))
    points, dense = collect(files, args.windows)
    if not points:
        raise SystemExit(f"no row evaluated on {args.windows} test windows in {len(files)} files")
    if args.out:
        draw(points, dense, args.out, args.windows)
    print(json.dumps({"windows": args.windows, "dense": dense, "official_slicegpt": OFFICIAL, "points": points,
                      "frontier": best_by_size(points),
                      "frontier_by_bytes": best_by_size(points, "bytes"), "plot": args.out or None}, indent=1))


if __name__ == "__main__":
    main()
