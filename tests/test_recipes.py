"""Recipes: stages validated up front, written and read back exactly, run like the passes they drive,
and recorded in the saved model."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxslice
from fxslice import InvalidOption, PassManager
from fxslice.passes import (
    STAGES,
    CausalAttention,
    CleanupIR,
    FuseNorms,
    FuseRepeatKV,
    ProjectNormWriters,
    UnstackWeights,
    load_recipe,
)
from fxslice.passes.catalogue import RunPasses
from fxslice.passes.presets import slicegpt_recipe
from fxslice.passes.rewrite.stages import Cleanup, FuseGQA
from fxslice.passes.slicegpt import SliceStream, constant_widths
from fxslice.passes.slicegpt.stages import Rotate, SliceGPT
from fxslice.recipes import Calibration, Recipe, Stage

CALIBRATION = torch.randint(0, 128, (8, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("stages,message", [
    ((SliceGPT(sparsity=0.25),), "needs clean"),
    ((Cleanup(), FuseGQA(), SliceGPT(sparsity=0.25)), "already gqa_fused"),
    ((Cleanup(), SliceGPT(sparsity=0.25), SliceGPT(sparsity=0.1)), "already sliced"),
    ((Cleanup(), Rotate(), SliceGPT(sparsity=0.1)), "already rotated"),
])
def test_a_wrong_order_is_refused_before_anything_runs(stages, message):
    with pytest.raises(InvalidOption, match=message):
        Recipe(stages)


@pytest.mark.parametrize("options,message", [
    ({}, "neither"),
    ({"sparsity": 0.2, "widths": (8, 8)}, "both"),
    ({"sparsity": 1.5}, "sparsity must be"),
    ({"sparsity": 0.2, "multiple": 0}, "multiple"),
    ({"widths": (8, -1)}, "positive integers"),
    ({"sparsity": 0.2, "batch_size": 0}, "batch_size"),
])
def test_bad_stage_options_name_the_combination(options, message):
    with pytest.raises(InvalidOption, match=message):
        SliceGPT(**options)


def test_stages_are_frozen_and_keyword_only():
    stage = SliceGPT(sparsity=0.25)
    with pytest.raises(AttributeError):
        stage.sparsity = 0.5
    with pytest.raises(TypeError):
        SliceGPT(0.25)


@settings(max_examples=30, deadline=None)
@given(sparsity=st.floats(0.0, 0.95, exclude_min=True), multiple=st.integers(1, 64), keep_ties=st.booleans(),
       shared=st.sampled_from([False, True, "none", "block", "stream"]),
       batch=st.integers(1, 16), windows=st.integers(1, 512), seed=st.integers(0, 2**31), causal=st.booleans(),
       suffix=st.sampled_from([".yaml", ".yml", ".json"]))
def test_recipes_round_trip_through_yaml_and_json(tmp_path_factory, sparsity, multiple, keep_ties, shared, batch,
                                                   windows, seed, causal, suffix):
    recipe = Recipe((Cleanup(causal_attention=causal),
                     SliceGPT(sparsity=sparsity, multiple=multiple, keep_ties=keep_ties, shared_basis=shared,
                              batch_size=batch), FuseGQA(), RunPasses(passes=("fuse_repeat_kv",))),
                    Calibration(windows=windows, length=64, seed=seed), name="mine")
    path = tmp_path_factory.mktemp("recipe") / f"r{suffix}"
    recipe.save(path)
    assert load_recipe(path) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict())), STAGES) == recipe


@pytest.mark.parametrize("text,message,trust", [
    ("stages: []", "non-empty list", False),
    ("stages: [{stage: nope}]", "unknown stage 'nope'", False),
    ("stages: [{stage: cleanup, causal: true}]", "no option 'causal'", False),
    ("stages: [{stage: cleanup, version: 9}]", "version 9", False),
    ("stages: [{stage: 'json:dumps'}]", "names code", False),  # refused before anything is imported
    ("stages: [{stage: 'no_such_module_xyz:Thing'}]", "names code", False),
    ("stages: [{stage: cleanup}]\nextra: 1", "unknown key", False),
    ("stages: [{stage: cleanup}\n", "not valid YAML", False),
    ("calibration: {windows: 0}\nstages: [{stage: cleanup}]", "windows must be", False),
    # trusted code is imported and checked while the recipe is read
    ("stages: [{stage: 'json:dumps'}]", "not a Stage", True),
    ("stages: [{stage: 'no_such_module_xyz:Thing'}]", "cannot import", True),
    ("stages: [{stage: passes, passes: ['missing.py:Nope']}]", "file not found", True),
])
def test_bad_recipe_files_are_one_clear_error(tmp_path, text, message, trust):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(InvalidOption, match=message):
        load_recipe(path, trust_code=trust)


def test_a_binary_recipe_file_is_one_clear_error(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(InvalidOption, match="not a text file"):
        load_recipe(path)


def test_a_user_stage_is_named_by_file_and_class(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "custom_recipe.py"
    path = tmp_path / "recipe.yaml"
    path.write_text(f"stages:\n  - {{stage: cleanup}}\n  - {{stage: '{example}:RoundWeights', bits: 4}}\n")
    recipe = load_recipe(path, trust_code=True)
    assert recipe.stages[1].kind == "round_weights" and recipe.stages[1].bits == 4
    assert isinstance(recipe.stages[1], Stage)


def test_the_slicegpt_preset_computes_what_its_passes_compute(tiny):
    _, program = tiny("llama")
    by_hand = program.clone()
    result = slicegpt_recipe(sparsity=0.25, batch_size=3).run(program, calibration=CALIBRATION)
    slicer = SliceStream(CALIBRATION, constant_widths(0.25), batch_size=3)
    PassManager([CleanupIR(), UnstackWeights(), CausalAttention(), ProjectNormWriters(), FuseNorms(), slicer,
                 FuseRepeatKV()]).run(by_hand)
    ids = program.probe_input()
    assert torch.equal(program(ids), by_hand(ids))
    assert [p.name for p in result.passes] == ["cleanup_ir", "unstack_weights", "causal_attention", "project_norm_writers",
                                               "fuse_norms", "slice_stream", "fuse_repeat_kv"]
    assert result.parameters == by_hand.num_parameters() < result.dense_parameters


def test_the_record_holds_the_recipe_and_every_pass_and_survives_save(tiny, tmp_path):
    _, program = tiny("llama")
    recipe = slicegpt_recipe(sparsity=0.25, batch_size=4)
    result = recipe.run(program, calibration=CALIBRATION)
    record = {"recipe": recipe.to_dict(), **result.record()}
    back = fxslice.load(fxslice.save(program, tmp_path / "out", record))
    saved = back.record
    assert Recipe.from_dict(saved["recipe"], STAGES) == recipe
    assert [s["stage"] for s in saved["stages"]] == ["cleanup", "slicegpt", "fuse_gqa"]
    passes = [p["name"] for s in saved["stages"] for p in s["passes"]]
    assert passes == [p.name for p in result.passes]
    slicing = saved["stages"][1]
    assert slicing["report"]["widths"] == [48] * 5 and slicing["passes"][-1]["parameters_changed"] > 0


def test_a_calibrating_stage_without_data_is_refused(tiny):
    _, program = tiny("llama")
    with pytest.raises(InvalidOption, match="no calibration section"):
        slicegpt_recipe(sparsity=0.25).run(program)


def test_a_custom_pass_stage_checks_exactness(tiny, tmp_path):
    bad = tmp_path / "bad_pass.py"
    bad.write_text("import torch\nfrom fxslice import as_pass\nfrom fxslice.core.graph import set_tensor, tensor_of\n\n"
                   "@as_pass(name='scale_head', exact=True)\ndef scale_head(program):\n"
                   "    set_tensor(program.gm, 'lm_head.weight', tensor_of(program.gm, 'lm_head.weight') * 2)\n"
                   "    return True\n")
    _, program = tiny("llama")
    recipe = Recipe((Cleanup(), RunPasses(passes=(f"{bad}:scale_head",))))
    with pytest.raises(fxslice.PassCheckFailed, match="scale_head"):
        recipe.run(program)


def test_cli_compress_runs_a_recipe_file_and_records_it(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("calibration: {windows: 4, length: 48}\n"
                      "stages:\n  - {stage: cleanup}\n  - {stage: slicegpt, sparsity: 0.25}\n  - {stage: fuse_gqa}\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fxslice.cli", "compress", str(model_dir), "--recipe", str(recipe), "--out", str(out),
           "--eval-windows", "2", "--eval-length", "48"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "perplexity   dense" in done.stdout and "compressed" in done.stdout
    record = json.loads((out / "fxslice.json").read_text())
    assert load_recipe(recipe) == Recipe.from_dict(record["recipe"], STAGES)
    slicing = next(s for s in record["stages"] if s["stage"] == "slicegpt")["report"]
    assert slicing["widths"] == [48] * 5 and record["parameters"] < record["dense_parameters"]
    assert "widths" not in record  # one place for each figure: the stage that produced it
    assert [s["stage"] for s in record["stages"]] == ["cleanup", "slicegpt", "fuse_gqa"]
    uncalibrated = tmp_path / "uncalibrated.yaml"
    uncalibrated.write_text("stages:\n  - {stage: cleanup}\n  - {stage: slicegpt, sparsity: 0.25}\n")
    refused = subprocess.run([*cmd[:4], str(model_dir), "--recipe", str(uncalibrated), "--out", str(tmp_path / "o3")],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "no calibration section" in refused.stderr
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("stages:\n  - {stage: slicegpt, sparsity: 0.25}\n")
    refused = subprocess.run([*cmd[:4], str(model_dir), "--recipe", str(wrong), "--out", str(tmp_path / "o2")],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "needs clean" in refused.stderr and not (tmp_path / "o2").exists()


def test_the_example_recipe_file_loads_and_runs(tiny, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root.parent)  # the recipe names its pass by a path relative to its own folder, not to here
    recipe = load_recipe(root / "examples" / "recipe.yaml", trust_code=True)
    assert [s.kind for s in recipe.stages] == ["cleanup", "slicegpt", "passes", "fuse_gqa"]
    assert recipe.calibration == Calibration(windows=32, length=2048)
    _, program = tiny("llama-tied")
    result = recipe.run(program, calibration=CALIBRATION)
    assert result.parameters < result.dense_parameters
    assert [p.name for p in result.passes][-2:] == ["fold_scale_into_linear", "fuse_repeat_kv"]


def test_a_recipe_can_continue_from_stated_facts_and_records_the_facts_it_leaves(tiny):
    with pytest.raises(InvalidOption, match="needs clean"):
        Recipe((SliceGPT(sparsity=0.25),))
    _, program = tiny("llama")
    Recipe((Cleanup(),)).run(program)
    assert program.record["facts"] == ["captured", "clean"]
    rest = Recipe((SliceGPT(sparsity=0.25, batch_size=4),), start=("captured", "clean"))
    assert Recipe.from_dict(rest.to_dict(), STAGES) == rest
    rest.run(program, calibration=CALIBRATION)
    assert program.record["facts"] == ["captured", "clean", "sliced"]


def test_cli_slice_is_the_preset_and_writes_its_recipe(tmp_path, tiny_model_dir):
    saved = tmp_path / "slice.yaml"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fxslice.cli", "slice", str(tiny_model_dir("llama")), "--sparsity", "0.25",
           "--calib-windows", "4", "--calib-length", "48", "--eval-windows", "2", "--eval-length", "48",
           "--save-recipe", str(saved), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = load_recipe(saved)
    assert recipe == slicegpt_recipe(sparsity=0.25, calibration=Calibration(windows=4, length=48))
    assert Recipe.from_dict(json.loads((out / "fxslice.json").read_text())["recipe"], STAGES) == recipe


def test_the_prune_recover_quantize_example_runs_and_shrinks_bytes(tiny):
    from fxslice.testing import char_tokenizer

    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "examples" / "compress.yaml")
    assert [s.kind for s in recipe.stages] == ["cleanup", "surgeon", "recover", "quantize", "fuse_gqa"]
    stages = tuple(dataclasses.replace(s, steps=3) if s.kind == "recover" else s for s in recipe.stages)
    _, program = tiny("llama")
    program.tokenizer = char_tokenizer()
    dense_bytes = program.num_bytes()
    result = Recipe(stages).run(program, calibration=CALIBRATION)
    assert result.parameters < 0.9 * result.dense_parameters
    assert program.num_bytes() < dense_bytes / 4 and program.quantized
    assert len(result.stages[2][1].report["losses"]) == 3


def test_the_slice_rotate_quantize_example_keeps_shortcuts_at_8_bits(tiny):
    from fxslice.analysis.linears import weight_kinds

    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "examples" / "slice-quantize.yaml")
    assert [s.kind for s in recipe.stages] == ["cleanup", "slicegpt", "rotate", "quantize"]
    stages = tuple(dataclasses.replace(s, head_rank=4) if s.kind == "slicegpt" else s for s in recipe.stages)
    _, program = tiny("llama-tied")
    dense_bytes = program.num_bytes()
    Recipe(stages).run(program, calibration=CALIBRATION)
    kinds = weight_kinds(program)
    assert kinds.shortcuts and {program.quantized[n].bits for n in kinds.shortcuts} == {8}
    assert {program.quantized[n].bits for n in set(kinds.linears) - kinds.shortcuts} == {4}
    assert program.num_bytes() < dense_bytes / 3


def test_a_recipe_written_with_the_old_calibration_batch_size_reads_with_a_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("calibration: {source: wikitext2:validation, windows: 4, length: 64, batch_size: 2}\n"
                    "stages: [{stage: cleanup}]\n")
    with pytest.warns(UserWarning, match="batch_size is ignored"):
        recipe = load_recipe(path)
    assert recipe.calibration.windows == 4 and "batch_size" not in recipe.to_dict()["calibration"]


@pytest.mark.parametrize("options,message", [
    ({"shared_basis": "foo"}, "'none', 'block' or 'stream'"),
    ({"shared_basis": ["block"]}, "'none', 'block' or 'stream'"),
    ({"shared_basis": "stream", "slice_head": False}, "full width"),
    ({"shared_basis": "stream", "sparsity": None, "widths": (40, 48)}, "one width"),
    ({"shared_basis": "stream", "allocation": "loss_aware"}, "no shared basis"),
])
def test_a_shared_basis_that_cannot_be_is_refused_when_the_stage_is_made(options, message):
    with pytest.raises(InvalidOption, match=message):
        SliceGPT(**{"sparsity": 0.25, **options})


def test_old_boolean_shared_basis_reads_as_its_name():
    assert SliceGPT(sparsity=0.25, shared_basis=True) == SliceGPT(sparsity=0.25, shared_basis="block")
    assert SliceGPT(sparsity=0.25, shared_basis=False).shared_basis == "none"
