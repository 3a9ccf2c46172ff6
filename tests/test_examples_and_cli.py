import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_custom_pass_example_runs_and_folds_the_scale(capsys):
    runpy.run_path(str(ROOT / "examples" / "custom_pass.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "fold_scale_into_linear" in out and "-1 nodes" in out and "weight values" in out


def test_the_example_pass_leaves_a_tied_weight_alone_and_stays_exact():
    """The scale reaches a head tied to the embedding: folding it into the shared table would scale the lookups too
    (0.27 relative error before the example checked its weights' other readers)."""
    import torch

    from fxslice import PassManager, capture

    example = runpy.run_path(str(ROOT / "examples" / "custom_pass.py"))

    class TiedScaled(example["Scaled"]):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.proj.weight = self.embed.weight

    torch.manual_seed(0)
    program = capture(TiedScaled()).to(torch.float64)
    ids = program.probe_input()
    before = program(ids)
    result = PassManager([example["FoldScaleIntoLinear"]()], check_numerics=True).run(program)
    assert not result.modified and torch.equal(program(ids), before)


@pytest.mark.parametrize("command", [[], ["inspect"], ["diff"], ["slice"], ["compress"], ["prune"]])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "fxslice.cli", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_cli_inspect_and_diff_on_a_local_model(tmp_path):
    from fxslice.testing import tiny_causal_lm

    tiny_causal_lm("gpt2").save_pretrained(tmp_path / "gpt2")
    run = [sys.executable, "-m", "fxslice.cli"]
    inspect = subprocess.run([*run, "inspect", str(tmp_path / "gpt2")], capture_output=True, text=True)
    assert inspect.returncode == 0, inspect.stderr
    assert "GPT2LMHeadModel" in inspect.stdout and "addmm" in inspect.stdout and "GPT2Block" in inspect.stdout
    page = tmp_path / "diff.html"
    diff = subprocess.run([*run, "diff", str(tmp_path / "gpt2"), "--html", str(page)], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stderr
    assert "cleanup_ir" in diff.stdout and page.read_text().startswith("<!doctype html>")
    assert "proved in float64" in diff.stdout  # the CLI proves exact passes as Python does
    removed = [line for line in diff.stdout.splitlines() if "_assert_tensor_metadata.default(" in line]
    assert removed and all(line.rstrip().endswith(")") or "  x" in line for line in removed)  # piped: no wrap
    assert any(len(line) > 100 for line in diff.stdout.splitlines())
    listed = subprocess.run([*run, "diff", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert "cleanup_ir" in listed.stdout and "fuse_norms" in listed.stdout
    assert "loading and capturing" in diff.stderr and "passes" in diff.stderr  # status and progress, off a terminal
    quiet = subprocess.run([*run, "--quiet", "diff", str(tmp_path / "gpt2")], capture_output=True, text=True)
    assert quiet.returncode == 0 and "proved in float64" in quiet.stdout
    assert quiet.stderr == "", quiet.stderr


def test_cli_error_is_one_message_with_its_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fxslice.cli", "inspect", str(tmp_path / "missing.gguf")],
                            capture_output=True, text=True)
    assert result.returncode == 3
    assert "CaptureError" in result.stderr and "Traceback" not in result.stderr


def test_custom_recipe_example_runs_and_refuses_the_wrong_order(capsys):
    runpy.run_path(str(ROOT / "examples" / "custom_recipe.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "round_linear_weights (lossy" in out and "slice_stream (lossy" in out
    assert "refused before running" in out and "already quantized" in out
