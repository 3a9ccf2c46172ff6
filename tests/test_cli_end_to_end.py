"""The main job from the command line on the embedded SmolLM2: slice, evaluate, generate, export for transformers."""

import json
import math
import subprocess
import sys

import pytest

from fxslice.evaluation.generate import generate
from fxslice.models.io import load

HF_GREEDY = """
import json, sys
sys.modules["fxslice"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompt = sys.argv[1:3]
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # (without it, 5.24 asks first)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
ids = tokenizer(prompt, return_tensors="pt").input_ids
print(json.dumps(model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)[0].tolist()))
"""


@pytest.mark.slow
def test_cli_slice_then_eval_end_to_end(tmp_path):
    out = tmp_path / "sliced"
    cmd = [sys.executable, "-m", "fxslice.cli", "slice", "--sparsity", "0.3", "--out", str(out),
           "--calib-windows", "4", "--calib-length", "128", "--eval-windows", "2", "--eval-length", "128"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "perplexity   dense" in result.stdout and "saved" in result.stdout
    record = json.loads((out / "fxslice.json").read_text())
    assert record["parameters"] < record["dense_parameters"]  # at 30%, shortcuts included
    slicing = next(s for s in record["stages"] if s["stage"] == "slicegpt")["report"]
    assert slicing["widths"] == [400] * 61 and record["calibration"]["windows"] == 4
    assert "widths       [400] of 576" in result.stdout
    assert math.isfinite(record["perplexity"]["compressed"]) and record["perplexity"]["dense"] > 1
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
    evaluated = subprocess.run([sys.executable, "-m", "fxslice.cli", "eval", str(out), "--eval-windows", "2",
                                "--eval-length", "128"], capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    value = float(evaluated.stdout.split()[1])
    assert abs(value - record["perplexity"]["compressed"]) < 1e-3 * value
    assert record["kv_cache"] is not None  # the saved graph carries a KV cache
    generated = subprocess.run([sys.executable, "-m", "fxslice.cli", "generate", str(out), "The capital of France is",
                                "--max-new-tokens", "8"], capture_output=True, text=True)
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert generated.stdout.startswith("The capital of France is") and len(generated.stdout) > 30
    assert "KV cache" in generated.stderr and "tokens/s" in generated.stderr
    # the same model as a transformers directory: loads with fxslice blocked, generates the same greedy tokens
    hf = tmp_path / "hf"
    exported = subprocess.run([sys.executable, "-m", "fxslice.cli", "export", str(out), "--format", "hf", "--out", str(hf)],
                              capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "with the KV cache" in exported.stdout
    stock = subprocess.run([sys.executable, "-c", HF_GREEDY, str(hf), "The capital of France is"], capture_output=True,
                           text=True)
    assert stock.returncode == 0, stock.stderr[-2000:]
    program = load(out)
    ids = program.tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert json.loads(stock.stdout.splitlines()[-1]) == generate(program, ids, max_new_tokens=8)[0].tolist()
