"""Perplexity against bytes for every quantized model measured on one protocol, as one PNG and one JSON object.

    python benchmarks/quantized_frontier.py [--windows 8] [--out docs/images/quantized-frontier.png] [FILES...]

Reads raw outputs of `quantization.py` (default: the runs listed in `RUNS`) and keeps the rows evaluated on the same
test windows with the same calibration, so no point is compared with one measured on other text. Each model family
(dense, dense + Hadamard, the Surgeon's pruned model, SliceGPT's) gets a colour; uniform widths are dots (RTN and GPTQ),
searched allocations stars. The front (no other model smaller *and* better) is drawn through them and printed: which recipe
to use at which size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from frontier import best_by_size, quantization_setting

RESULTS = Path(__file__).parent / "results"
#: runs on the current quantizer (GPTQ in activation order; SliceGPT's shortcut matrices fixed), 16 x 512 calibration
RUNS = [
    "quantization-2026-11-27-rotate.json",
    "quantization-2026-11-28-search-3bits.json",
    "quantization-2026-11-28-search-4.77bits.json",
    "quantization-2026-11-28-search-seen.json",
    "quantization-2026-11-28-search-tables.json",
    "quantization-2026-11-28-slice-hadamard.json",
    "quantization-2026-11-28-slice-shortcuts-8bit.json",
    "quantization-2026-11-29-prune.json",
    "quantization-2026-11-29-search-pruned.json",
    "quantization-2026-11-29-search-dense-3.82.json",
    "quantization-2026-11-29-prune-hadamard.json",
    "quantization-2026-11-29-search-pruned-hadamard.json",
    "quantization-2026-11-29-slice-prune.json",
    "quantization-2026-11-29-search-pruned-seed1.json",
    "quantization-2026-12-06-learned-rotation.json",
    "quantization-2026-12-06-token-table.json",
    "quantization-2026-12-06-search-learned-rotation.json",
    "quantization-2026-12-07-distilled-search.json",
]
#: the calibration every run drawn here used (WikiText-2 validation, seed 0)
CALIBRATION = {"text": "wikitext2:validation", "windows": 16, "length": 512}
#: models above this perplexity are broken (2-bit, SliceGPT's 3-bit): kept in the JSON, off the picture
CEILING = 200.0


def points(paths: list[Path], windows: int) -> list[dict]:
    """One point per quantized model (float rows left out); a model several runs report (the uniform rows each run
    repeats) once."""
    seen: dict[tuple, dict] = {}
    for path in paths:
        data = json.loads(path.read_text())
        if data["evaluation"]["windows"] != windows or data["calibration"] != CALIBRATION:
            continue
        for row in data["results"] + data.get("searches", []):
            if row["weights"] == "float32":
                continue
            point = {"model": row["model"], "weights": row["weights"] + quantization_setting(row, data),
                     "searched": "search" in row["weights"],
                     "bytes": row["bytes"], "perplexity": round(row["perplexity"], 2), "run": path.name}
            seen.setdefault((row["model"], row["weights"], row["bytes"], point["perplexity"]), point)
    return sorted(seen.values(), key=lambda p: p["bytes"])


def draw(points: list[dict], edge: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    families = sorted({p["model"] for p in points})
    colours = dict(zip(families, plt.get_cmap("tab10").colors, strict=False))
    for family in families:
        for searched, marker, size in ((False, "o", 30), (True, "*", 120)):
            mine = [p for p in points if p["model"] == family and p["searched"] == searched and p["perplexity"] < CEILING]
            if mine:
                ax.scatter([p["bytes"] / 1e6 for p in mine], [p["perplexity"] for p in mine], marker=marker, s=size,
                           color=colours[family], label=f"{family}, {'searched' if searched else 'uniform'}")
    shown = [p for p in edge if p["perplexity"] < CEILING]
    ax.step([p["bytes"] / 1e6 for p in shown], [p["perplexity"] for p in shown], where="post", color="grey",
            linestyle="--", linewidth=1, label="front (smaller and better than all others)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([20, 30, 40, 60, 100, 150])
    ax.set_xlabel("MB as stored (packed integers, scales, float tensors, the tied table once)")
    ax.set_ylabel("WikiText-2 test perplexity (first 8 windows)")
    ax.set_title("SmolLM2-135M quantized: dense, pruned, sliced")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="raw outputs of quantization.py (default: RUNS)")
    parser.add_argument("--windows", type=int, default=8, help="test windows the rows must have been evaluated on")
    parser.add_argument("--out", default="docs/images/quantized-frontier.png", help="PNG to write ('' for none)")
    args = parser.parse_args()
    paths = [Path(f) for f in args.files] or [RESULTS / name for name in RUNS if (RESULTS / name).exists()]
    found = points(paths, args.windows)
    edge = best_by_size(found, size="bytes")
    if args.out:
        draw(found, edge, args.out)
    print(json.dumps({"windows": args.windows, "runs": [p.name for p in paths], "front": edge, "points": found},
                     indent=1))


if __name__ == "__main__":
    main()
