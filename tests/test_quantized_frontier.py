"""The quantized-models picture keeps only rows of one protocol, leaves float rows out, and its front holds exactly
the models that no smaller model beats."""

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # as when run as a script: it imports its sibling frontier.py
    sys.path.insert(0, str(BENCHMARKS))
_spec = importlib.util.spec_from_file_location(
    "quantized_frontier", BENCHMARKS / "quantized_frontier.py")
quantized_frontier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quantized_frontier)

CALIBRATION = quantized_frontier.CALIBRATION


def run(tmp_path, name, windows, results, searches=(), calibration=CALIBRATION):
    path = tmp_path / name
    path.write_text(json.dumps({"evaluation": {"windows": windows}, "calibration": calibration,
                                "results": results, "searches": list(searches)}))
    return path


def row(model, weights, size, perplexity):
    return {"model": model, "weights": weights, "bytes": size, "perplexity": perplexity}


def test_only_quantized_rows_of_the_same_windows_and_calibration_are_drawn_once(tmp_path):
    paths = [
        run(tmp_path, "a.json", 8, [row("dense", "float32", 500, 19.0), row("dense", "gptq 4-bit", 90, 22.6)],
            searches=[row("dense", "mtgp search at 5.1 bits", 85, 21.3)]),
        run(tmp_path, "b.json", 8, [row("dense", "gptq 4-bit", 90, 22.6), row("surgeon", "gptq 3-bit", 60, 70.0)]),
        run(tmp_path, "whole.json", 148, [row("dense", "gptq 3-bit", 70, 40.0)]),
        run(tmp_path, "other-calibration.json", 8, [row("dense", "gptq 3-bit", 70, 41.0)],
            calibration={**CALIBRATION, "windows": 8}),
    ]
    found = quantized_frontier.points(paths, windows=8)
    assert [(p["model"], p["weights"]) for p in found] == [
        ("surgeon", "gptq 3-bit"), ("dense", "mtgp search at 5.1 bits"), ("dense", "gptq 4-bit")]
    assert [p["searched"] for p in found] == [False, True, False]


def test_the_front_keeps_each_model_that_every_smaller_model_is_worse_than():
    models = [{"bytes": b, "perplexity": p} for b, p in
              [(60, 70.0), (64, 35.0), (70, 40.0), (73, 34.0), (75, 34.0), (90, 22.0), (85, 21.0), (140, 19.0)]]
    edge = quantized_frontier.best_by_size(models, size="bytes")
    assert [(p["bytes"], p["perplexity"]) for p in edge] == [(60, 70.0), (64, 35.0), (73, 34.0), (85, 21.0),
                                                             (140, 19.0)]
    for point in models:  # everything left out is beaten by a model on the front no larger than it
        if point not in edge:
            assert any(e["bytes"] <= point["bytes"] and e["perplexity"] <= point["perplexity"] for e in edge)
