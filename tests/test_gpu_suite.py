"""The GPU suite runs end to end on the CPU with tiny shapes, so that the day a GPU is lent it costs one call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_suite_runs_every_section_on_the_cpu_small(tmp_path):
    out = tmp_path / "suite.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--device", "cpu", "--small",
                           "--eval-windows", "2", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert set(sections) == {"correctness", "calibration", "inference", "shapes"}
    for name, figures in sections.items():
        assert "error" not in figures, (name, figures.get("error"), figures.get("trace"))
    correctness = sections["correctness"]
    assert correctness["generate_equal_after_load"] and correctness["pt2_runs"]
    assert correctness["hf"].startswith("remote code")  # the Surgeon left per-layer widths: no stock config holds them
    assert abs(correctness["perplexity_ratio"] - 1) < 1e-4  # float32 on the CPU against itself
    assert sections["inference"]["pruned_prefill_1x64_tokens_per_s"] > 0
    assert sections["shapes"]["small"]["parameters"] > 0
    assert "correctness" in done.stdout  # the table
