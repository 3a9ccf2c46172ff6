"""The frontier benchmark draws only rows measured on the same test windows, counts what it should, and keeps the
points that no smaller model beats."""

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("frontier", Path(__file__).parents[1] / "benchmarks" / "frontier.py")
frontier = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(frontier)


def write(tmp_path, name, windows, results, **extra):
    path = tmp_path / name
    path.write_text(json.dumps({"evaluation": {"windows": windows}, "results": results, **extra}))
    return str(path)


def test_rows_from_other_windows_superseded_rows_and_zero_masks_are_left_out(tmp_path):
    files = [
        write(tmp_path, "q.json", 8, [{"sparsity": "dense", "parameters": 100, "perplexity": 10.0},
                                      {"sparsity": 0.25, "allocation": "constant", "parameters": 80, "perplexity": 40.0},
                                      {"sparsity": 0.25, "allocation": "old", "parameters": 80, "perplexity": 900.0,
                                       "note": "superseded"},
                                      {"sparsity": 0.25, "allocation": "constant", "refit": {"mode": "writers"},
                                       "parameters": 80, "perplexity": 45.0}]),
        write(tmp_path, "p.json", 8, [{"method": "dense", "parameters": 100, "perplexity": 10.0},
                                      {"method": "surgeon", "parameters": 85, "perplexity": 20.0,
                                       "perplexity_recovered": 15.0, "recovered_parameters": 85},
                                      {"method": "surgeon", "parameters": 100, "nonzero_parameters": 80,
                                       "perplexity": 12.0}]),
        write(tmp_path, "other.json", 148, [{"sparsity": 0.25, "parameters": 80, "perplexity": 90.0}]),
        write(tmp_path, "speed.json", 8, [{"batch": 1, "tokens_per_second": 3.0}]),
    ]
    points, dense = frontier.collect(files, 8)
    assert dense == {"parameters": 100, "bytes": 400, "perplexity": 10.0}
    assert sorted((p["recipe"], p["parameters"], p["perplexity"]) for p in points) == [
        ("LLM Surgeon", 85, 20.0), ("LLM Surgeon + recovery", 85, 15.0),
        ("SliceGPT constant, tie kept", 80, 40.0), ("SliceGPT constant, tie kept, refit writers", 80, 45.0)]
    best = frontier.best_by_size(points)
    assert [(p["parameters"], p["perplexity"]) for p in best] == [(80, 40.0), (85, 15.0)]


def test_quantized_rows_count_their_stored_bytes_and_float_rows_four_per_parameter(tmp_path):
    files = [
        write(tmp_path, "q.json", 8, [
            {"model": "dense", "weights": "float32", "parameters": 100, "bytes": 400, "perplexity": 10.0},
            {"model": "dense", "weights": "gptq 4-bit", "parameters": 100, "bytes": 60, "perplexity": 12.0},
            {"model": "dense + hadamard", "weights": "gptq 4-bit", "parameters": 100, "bytes": 60, "perplexity": 11.5},
            {"model": "surgeon 0.2 + hadamard", "weights": "gptq 4-bit", "parameters": 80, "bytes": 50,
             "perplexity": 14.0},
            {"model": "surgeon 0.2", "weights": "float32", "parameters": 80, "bytes": 320, "perplexity": 13.0},
            {"model": "dense", "weights": "rtn 3-bit + learned rotation", "parameters": 100, "bytes": 45,
             "perplexity": 30.0},
            {"model": "dense", "weights": "gptq 4-bit", "parameters": 110, "bytes": 70, "perplexity": 11.9,
             "table": "4-bit, untied head 8-bit"},
            {"model": "dense", "weights": "rtn 4-bit", "parameters": 100, "bytes": 62, "perplexity": 10.1,
             "grid": "offset", "group_size": 32, "table": "8-bit, tied"}]),
        write(tmp_path, "old.json", 8, [{"model": "dense", "weights": "gptq 3-bit", "parameters": 100, "bytes": 40,
                                         "perplexity": 48.0}], embedding_bits=4),
        write(tmp_path, "s.json", 8, [], searches=[
            {"model": "dense", "weights": "mtgp search at 5.1 bits", "parameters": 100, "bytes": 58,
             "perplexity": 11.8}]),
        write(tmp_path, "d.json", 8, [{"method": "surgeon", "parameters": 80, "perplexity": None,
                                       "perplexity_recovered": 12.5, "recovered_parameters": 80}],
              recover={"objective": "distill"}),
    ]
    points, dense = frontier.collect(files, 8)
    assert dense == {"parameters": 100, "bytes": 400, "perplexity": 10.0}
    assert sorted((p["recipe"], p["bytes"], p["perplexity"]) for p in points) == [
        ("GPTQ", 60, 12.0), ("GPTQ, table 4-bit", 40, 48.0), ("GPTQ, table 4-bit, untied head 8-bit", 70, 11.9), ("Hadamard → GPTQ", 60, 11.5), ("LLM Surgeon + distilled from dense", 320, 12.5),
        ("RTN, offset grid in groups of 32", 62, 10.1), ("Surgeon → Hadamard → GPTQ", 50, 14.0),
        ("learned rotation → RTN", 45, 30.0), ("searched widths (mtgp)", 58, 11.8)]
    best = frontier.best_by_size(points, "bytes")
    assert [(p["bytes"], p["perplexity"]) for p in best] == [(40, 48.0), (45, 30.0), (50, 14.0), (58, 11.8), (60, 11.5),
                                                              (62, 10.1)]


def test_the_picture_is_drawn_with_both_panels(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    points = [{"recipe": "GPTQ", "parameters": 100, "bytes": 60, "perplexity": 12.0},
              {"recipe": "LLM Surgeon", "parameters": 80, "bytes": 320, "perplexity": 13.0}]
    frontier.draw(points, {"parameters": 100, "bytes": 400, "perplexity": 10.0}, str(tmp_path / "f.png"), 148)
    assert (tmp_path / "f.png").stat().st_size > 10_000
