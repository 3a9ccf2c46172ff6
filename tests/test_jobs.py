"""`fxslice.compress`: the whole job as one call, the same record the CLI writes."""

import json

import pytest
import torch

import fxslice
from fxslice import InvalidOption
from fxslice.evaluation.generate import generate
from fxslice.passes import prune_recipe, slicegpt_recipe
from fxslice.recipes import Calibration


def _text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return str(path)


def test_compress_runs_the_whole_job_and_saves_what_load_reads(tmp_path, tiny_model_dir):
    text = _text(tmp_path)
    recipe = slicegpt_recipe(sparsity=0.25, multiple=4, calibration=Calibration(source=text, windows=4, length=32))
    notes = []
    report = fxslice.compress(str(tiny_model_dir("llama")), recipe, out=tmp_path / "out", evaluation=text,
                              eval_windows=3, eval_length=32, options={"why": "test"}, progress=False,
                              note=notes.append)
    assert isinstance(report, fxslice.Report) and not notes
    assert report.result.parameters < report.result.dense_parameters
    assert set(report.perplexity) == {"dense", "compressed"} and all(v > 1 for v in report.perplexity.values())
    text_report = str(report)
    assert "widths       [48] of 64" in text_report and "perplexity   dense" in text_report
    assert f"saved        {tmp_path / 'out'}" in text_report
    saved = json.loads((tmp_path / "out" / "fxslice.json").read_text())
    assert saved["why"] == "test" and saved["perplexity"] == report.perplexity
    assert saved["evaluation"] == {"source": text, "windows": 3, "length": 32}
    assert [s["stage"] for s in saved["stages"]] == ["cleanup", "slicegpt", "fuse_gqa"]
    loaded = fxslice.load(tmp_path / "out")
    ids = report.program.probe_input(batch=1, length=6)
    assert torch.allclose(loaded(ids), report.program(ids), atol=1e-5)
    assert loaded.cache is not None  # the KV-cache capture followed the recipe


def test_compress_takes_a_module_with_its_tokenizer_and_skips_evaluation(tmp_path, char_tokenizer):
    from fxslice.testing import tiny_causal_lm

    model = tiny_causal_lm("llama")
    model.tokenizer = char_tokenizer
    recipe = prune_recipe(target=0.2, shots=1, calibration=Calibration(source=_text(tmp_path), windows=4, length=32))
    report = fxslice.compress(model, recipe, evaluation=None, progress=False)
    assert report.out is None and report.perplexity == {} and "perplexity" not in str(report)
    assert report.record["evaluation"]["windows"] == 0
    assert report.result.parameters < report.result.dense_parameters
    # the KV-cache capture carries the pruned weights: it decodes the tokens the plain program computes
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    assert report.cached is not None and report.cached.num_parameters() == report.program.num_parameters()
    torch.testing.assert_close(generate(report.cached, ids, max_new_tokens=4), generate(report.program, ids, max_new_tokens=4))
    with pytest.raises(InvalidOption, match="the module is in torch.float32, not torch.bfloat16"):
        fxslice.compress(model, recipe, evaluation=None, dtype="bfloat16", progress=False)


def test_compress_checks_the_output_before_any_work(tmp_path, tiny_model_dir):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    recipe = slicegpt_recipe(sparsity=0.25, calibration=Calibration(source=_text(tmp_path), windows=4, length=32))
    with pytest.raises(fxslice.FxsliceError, match="taken"):
        fxslice.compress("does-not-exist-anywhere", recipe, out=tmp_path / "taken", progress=False)


def test_proofs_in_the_runs_dtype_skip_the_float64_copy_and_the_record_says_so(tmp_path, tiny_model_dir):
    recipe = slicegpt_recipe(sparsity=0.25, calibration=Calibration(source=_text(tmp_path), windows=4, length=32))
    model = str(tiny_model_dir("llama"))
    checked = {}
    for proofs in ("float64", "dtype"):
        report = fxslice.compress(model, recipe, evaluation=None, proofs=proofs, progress=False)
        exact = [r for _, stage in report.result.stages for r in stage.records if r.exact and r.modified]
        checked[proofs] = {r.checked for r in exact}
        assert report.record["proofs"] == proofs and exact
        if proofs == "dtype":
            assert all("--proofs dtype" in r.unproved for r in exact)
    assert checked == {"float64": {"float64"}, "dtype": {"float32"}}
    with pytest.raises(InvalidOption, match="proofs must be one of"):
        fxslice.compress(model, recipe, evaluation=None, proofs="none", progress=False)


def test_a_saved_model_goes_on_to_be_quantized_and_only_that(tmp_path, tiny_model_dir):
    """Prune, save; later quantize the saved model (its KV-cache graph, no plain capture): the second job starts from
    what the first saved, records where it came from, and refuses what needs the original (pruning again) or what
    was done already (quantizing twice), before any work and without writing anything."""
    from typer.testing import CliRunner

    from fxslice.cli import app
    from fxslice.passes.quantize.stages import Quantize
    from fxslice.passes.rewrite.stages import Cleanup
    from fxslice.recipes import Recipe

    text = _text(tmp_path)
    calibration = Calibration(source=text, windows=4, length=32)
    pruned = fxslice.compress(str(tiny_model_dir("llama")), prune_recipe(target=0.2, shots=1, calibration=calibration),
                              out=tmp_path / "pruned", evaluation=text, eval_windows=3, eval_length=32, progress=False)
    recipe = Recipe((Cleanup(), Quantize(bits=4, group_size=16)), calibration)
    report = fxslice.compress(str(tmp_path / "pruned"), recipe, out=tmp_path / "q", evaluation=text, eval_windows=3,
                              eval_length=32, progress=False)
    assert report.perplexity["before"] == pytest.approx(pruned.perplexity["compressed"], rel=1e-4)
    assert "perplexity   before" in str(report)
    assert report.result.dense_parameters == pruned.result.dense_parameters  # the original's, from the record
    assert report.result.parameters == pruned.result.parameters
    record = json.loads((tmp_path / "q" / "fxslice.json").read_text())
    assert record["continued_from"]["model"] == str(tmp_path / "pruned")
    assert record["continued_from"]["recipe"]["stages"][1]["stage"] == "surgeon"
    assert {"pruned", "quantized", "kv_cache"} <= set(record["facts"])
    quantized = fxslice.load(tmp_path / "q")
    assert quantized.cache is not None and quantized.quantized
    ids = report.program.probe_input(batch=1, length=6)
    torch.testing.assert_close(quantized(ids), report.program(ids), rtol=1e-5, atol=1e-5)

    with pytest.raises(InvalidOption, match="saved by fxslice.*surgeon calibrate"):
        fxslice.compress(str(tmp_path / "pruned"), prune_recipe(target=0.2, shots=1, calibration=calibration),
                         out=tmp_path / "again", progress=False)
    with pytest.raises(InvalidOption, match="already.*quantized"):
        fxslice.compress(str(tmp_path / "q"), recipe, out=tmp_path / "twice", progress=False)
    assert not (tmp_path / "again").exists() and not (tmp_path / "twice").exists()

    made = CliRunner().invoke(app, ["quantize", str(tmp_path / "pruned"), "--bits", "4", "--group-size", "16",
                                    "--method", "rtn", "--eval", "none", "--out", str(tmp_path / "cli")])
    assert made.exit_code == 0, made.output
    assert fxslice.load(tmp_path / "cli").num_parameters() == pruned.result.parameters
