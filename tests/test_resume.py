"""An interrupted compression continues from its checkpoint (`fxslice.jobs.checkpoint`) and saves the very files an
uninterrupted run saves; a checkpoint of another run is refused, not overwritten."""

from __future__ import annotations

import json
import re

import pytest
import torch

import fxslice
from fxslice import InvalidOption
from fxslice.core.disk import Scratch
from fxslice.passes.quantize.stages import Quantize
from fxslice.passes.rewrite.stages import Cleanup
from fxslice.passes.slicegpt.stages import SliceGPT
from fxslice.passes.surgeon.stages import Surgeon
from fxslice.recipes import Calibration, Recipe
from fxslice.testing import char_tokenizer, tiny_causal_lm


def _model(tmp_path, family: str = "llama"):
    path = tmp_path / family
    tiny_causal_lm(family).save_pretrained(path, max_shard_size="40KB")
    char_tokenizer().save_pretrained(path)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return str(path), str(text)


def _recipe(text: str, *, sparsity: float = 0.25, shots: int = 1, structures: str = "groups") -> Recipe:
    calibration = Calibration(source=text, windows=4, length=32)
    return Recipe((Cleanup(), SliceGPT(sparsity=sparsity, multiple=4),
                   Surgeon(target=0.1, shots=shots, structures=structures),
                   Quantize(bits=4, group_size=16)), calibration)


def _compress(model: str, text: str, out, notes: list[str] | None = None, **options):
    notes = [] if notes is None else notes
    recipe = options.pop("recipe", {})
    recipe = recipe if isinstance(recipe, Recipe) else _recipe(text, **recipe)
    report = fxslice.compress(model, recipe, out=out, evaluation=text,
                              eval_windows=2, eval_length=32, progress=False, note=notes.append, **options)
    return report, notes


class Interrupted(KeyboardInterrupt):
    pass


def _interrupted(monkeypatch, model: str, text: str, out, stage_cls=Quantize, notes: list[str] | None = None,
                 **options) -> None:
    """The job, with Ctrl-C as `stage_cls` starts: the stages before it are done and checkpointed."""
    def stop(self, program, context):
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(stage_cls, "run", stop)
        with pytest.raises(Interrupted):
            _compress(model, text, out, notes, **options)


def _saved(out) -> dict:
    record = json.loads((out / "fxslice.json").read_text())
    for stage in record["stages"]:  # times differ from run to run
        stage.pop("seconds")
        for entry in stage["passes"]:
            entry.pop("seconds")
            entry["summary"] = re.sub(r"\d+\.\d+s", "", entry["summary"])
    return {k: v for k, v in record.items() if k not in ("seconds",)}


@pytest.mark.parametrize(("lazy", "cut"), [(False, Surgeon), (False, Quantize), (True, Quantize)])
def test_a_run_interrupted_after_a_stage_resumes_and_saves_the_uninterrupted_files(tmp_path, monkeypatch, lazy, cut):
    monkeypatch.setattr(Scratch, "MIN_BYTES", 0)  # lazily: every edited weight in a scratch file
    model, text = _model(tmp_path)
    whole, _ = _compress(model, text, tmp_path / "whole", lazy=lazy)
    assert not (tmp_path / "whole.resume").exists()  # a finished run leaves no checkpoint

    said: list[str] = []
    _interrupted(monkeypatch, model, text, tmp_path / "cut", cut, said, lazy=lazy)
    assert not (tmp_path / "cut").exists()
    generations = sorted(p.name for p in (tmp_path / "cut.resume").iterdir())
    done = 2 if cut is Surgeon else 3
    assert said == [f"the run stopped; {tmp_path / 'cut.resume'} holds it after {done} stages: the same command "
                    "continues from there (--restart / resume=False starts over)"]
    assert generations == [f"stage-{done}"]  # the older checkpoint was replaced

    resumed, notes = _compress(model, text, tmp_path / "cut", lazy=lazy)
    assert any(f"{done} of 4 stages done" in n for n in notes)
    assert not (tmp_path / "cut.resume").exists()
    first, second = _saved(tmp_path / "whole"), _saved(tmp_path / "cut")
    assert second["weights_sha256"] == first["weights_sha256"] and second["graph_sha256"] == first["graph_sha256"]
    assert second == first  # the record too: stages, reports, perplexities, the KV cache's layout
    assert resumed.perplexity == whole.perplexity
    ids = whole.program.probe_input(batch=1, length=5)
    loaded = fxslice.load(tmp_path / "cut")
    assert loaded.cache is not None
    torch.testing.assert_close(loaded(ids), whole.program(ids), rtol=0, atol=0)


@pytest.mark.parametrize(("lazy", "structures"), [(False, "groups"), (True, "groups"), (False, "rows_columns")])
def test_a_run_interrupted_between_two_surgeon_shots_resumes_from_the_first(tmp_path, monkeypatch, lazy, structures):
    """Killed in the second of three shots, the run keeps the checkpoint written after the first (and the second
    stage before it); run again, it continues from there — the first shot is not repeated — and saves the weights,
    graph, shot reports and perplexities of an uninterrupted run."""
    from fxslice.jobs import checkpoint
    from fxslice.passes.surgeon import SurgeonMask, SurgeonPrune

    monkeypatch.setattr(Scratch, "MIN_BYTES", 0)
    monkeypatch.setattr(checkpoint, "STEP_EVERY", 0.0)
    monkeypatch.setattr(checkpoint, "STEP_WRITE_RATIO", 0.0)  # a checkpoint after every shot, however slow the writes
    model, text = _model(tmp_path)
    recipe = {"shots": 3, "structures": structures}
    whole, _ = _compress(model, text, tmp_path / "whole", lazy=lazy, recipe=dict(recipe))
    surgeon = SurgeonPrune if structures == "groups" else SurgeonMask
    real, shots = surgeon._shot, []

    def counted(self, program, shot, *rest):
        shots.append(shot)
        if shot == 2 and len(shots) == 2:  # the first run: Ctrl-C in its second shot
            raise Interrupted
        return real(self, program, shot, *rest)

    monkeypatch.setattr(surgeon, "_shot", counted)
    said: list[str] = []
    with pytest.raises(Interrupted):
        _compress(model, text, tmp_path / "cut", said, lazy=lazy, recipe=dict(recipe))
    assert sorted(p.name for p in (tmp_path / "cut.resume").iterdir()) == ["stage-2.1"]
    assert said[-1].startswith(f"the run stopped; {tmp_path / 'cut.resume'} holds it after 2 stages and 1 step of the "
                               "next")
    resumed, notes = _compress(model, text, tmp_path / "cut", lazy=lazy, recipe=dict(recipe))
    assert shots == [1, 2, 2, 3]  # shot 1 ran once
    assert any("2 of 4 stages done, and 1 step of the next" in n for n in notes)
    assert not (tmp_path / "cut.resume").exists()
    first, second = _saved(tmp_path / "whole"), _saved(tmp_path / "cut")
    assert second["weights_sha256"] == first["weights_sha256"] and second["graph_sha256"] == first["graph_sha256"]
    assert second["stages"][2]["report"] == first["stages"][2]["report"]  # every shot's figures
    for record in (first, second):  # the interrupted pass measured how far the logits moved since it resumed
        for entry in record["stages"][2]["passes"]:
            entry.pop("logits_moved"), entry.pop("summary")
    assert second == first  # the rest of the record too: the other stages' entries, perplexities, the cache layout
    assert resumed.perplexity == whole.perplexity
    ids = whole.program.probe_input(batch=1, length=5)
    loaded = fxslice.load(tmp_path / "cut")
    assert loaded.cache is not None
    torch.testing.assert_close(loaded(ids), whole.program(ids), rtol=0, atol=0)


@pytest.mark.parametrize(("lazy", "rotation"), [(False, "none"), (True, "none"), (False, "learned")])
def test_a_run_interrupted_between_two_gptq_weights_resumes_from_the_last_checkpoint(tmp_path, monkeypatch, lazy,
                                                                                     rotation):
    """Killed while GPTQ quantizes its seventh weight, the run keeps the checkpoint written after the sixth; run
    again, it quantizes only the weights left (no rotation learned again, no weight twice) and saves the weights,
    graph, reports and perplexities of an uninterrupted run."""
    from fxslice.jobs import checkpoint
    from fxslice.passes.quantize import quantize as module

    monkeypatch.setattr(Scratch, "MIN_BYTES", 0)
    monkeypatch.setattr(checkpoint, "STEP_EVERY", 0.0)
    monkeypatch.setattr(checkpoint, "STEP_WRITE_RATIO", 0.0)
    model, text = _model(tmp_path)
    recipe = Recipe((Cleanup(), Quantize(bits=4, group_size=16, rotation=rotation, rotation_steps=2)),
                    Calibration(source=text, windows=4, length=32))
    whole, _ = _compress(model, text, tmp_path / "whole", lazy=lazy, recipe=recipe)
    real, quantized, calibrated, learned = module.QuantizeWeights._quantize, [], [], []

    def counted(self, program, name, width, uses, hessian):
        quantized.append(name)
        if hessian is not None:
            calibrated.append(name)
            if len(calibrated) == 7:
                raise Interrupted  # the first run: Ctrl-C in GPTQ's seventh weight
        return real(self, program, name, width, uses, hessian)

    from fxslice.passes.quantize.learned_rotation import LearnRotation

    real_call = LearnRotation.call
    monkeypatch.setattr(LearnRotation, "call", lambda self, program: learned.append(1) or real_call(self, program))
    monkeypatch.setattr(module.QuantizeWeights, "_quantize", counted)
    said: list[str] = []
    with pytest.raises(Interrupted):
        _compress(model, text, tmp_path / "cut", said, lazy=lazy, recipe=recipe)
    assert sorted(p.name for p in (tmp_path / "cut.resume").iterdir()) == ["stage-1.6"]
    assert said[-1].startswith(f"the run stopped; {tmp_path / 'cut.resume'} holds it after 1 stage")
    first_run = list(quantized)
    resumed, notes = _compress(model, text, tmp_path / "cut", lazy=lazy, recipe=recipe)
    assert any("1 of 2 stages done, and 6 steps of the next" in n for n in notes)
    again = quantized[len(first_run):]
    assert not set(again) & set(first_run[:-1]) and again[0] == first_run[-1]  # nothing quantized twice
    assert len(learned) == (1 if rotation == "learned" else 0)  # the rotation was not learned again
    assert not (tmp_path / "cut.resume").exists()
    first, second = _saved(tmp_path / "whole"), _saved(tmp_path / "cut")
    assert second["weights_sha256"] == first["weights_sha256"] and second["graph_sha256"] == first["graph_sha256"]
    assert second["stages"][1]["report"] == first["stages"][1]["report"]
    for record in (first, second):  # the interrupted pass counted and measured only what it did since it resumed
        for entry in record["stages"][1]["passes"]:
            if entry["name"] == "quantize_weights":
                for key in ("logits_moved", "summary", "parameters_changed"):
                    entry.pop(key)
    assert second == first
    assert resumed.perplexity == whole.perplexity
    ids = whole.program.probe_input(batch=1, length=5)
    loaded = fxslice.load(tmp_path / "cut")
    assert loaded.cache is not None
    torch.testing.assert_close(loaded(ids), whole.program(ids), rtol=0, atol=0)


def test_checkpoints_within_a_stage_wait_step_every_and_ten_times_the_last_write(tmp_path, monkeypatch):
    from fxslice.jobs import checkpoint

    clock = [1000.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])

    def slow_save(program, folder):  # a checkpoint that takes 100 s to write
        folder.mkdir()
        clock[0] += 100.0

    monkeypatch.setattr(checkpoint, "save", slow_save)
    job = checkpoint.JobCheckpoint(tmp_path / "out", {"model": "m"})
    assert not job.step_due()
    clock[0] += checkpoint.STEP_EVERY
    assert job.step_due()
    job.write(None, None, [], {"dense_parameters": 1}, {"stage": 0, "state": {}}, 1)
    assert job.where() == "0 stages and 1 step of the next"
    clock[0] += checkpoint.STEP_EVERY
    assert not job.step_due()  # ten times the 100 s the last one took have not passed
    clock[0] += 1000.0 - checkpoint.STEP_EVERY
    assert job.step_due()
    with pytest.raises(InvalidOption, match="both the stage's state and its steps"):
        job.write(None, None, [], {"dense_parameters": 1}, None, 2)


def test_a_checkpoint_of_another_run_is_refused_until_the_run_starts_over(tmp_path, monkeypatch):
    model, text = _model(tmp_path)
    _interrupted(monkeypatch, model, text, tmp_path / "out")
    with pytest.raises(InvalidOption, match=r"another run \(it differs in: recipe\).*--restart"):
        _compress(model, text, tmp_path / "out", recipe={"sparsity": 0.5})
    with pytest.raises(InvalidOption, match=r"differs in: dtype"):
        _compress(model, text, tmp_path / "out", dtype="bfloat16")
    assert (tmp_path / "out.resume" / "stage-3").is_dir()  # refusing it kept it
    report, notes = _compress(model, text, tmp_path / "out", recipe={"sparsity": 0.5}, resume=False)
    assert not any("stages done" in n for n in notes) and not (tmp_path / "out.resume").exists()
    assert report.record["recipe"]["stages"][1]["sparsity"] == 0.5


def test_the_cli_refuses_another_runs_checkpoint_and_starts_over_with_restart(tmp_path, monkeypatch):
    import subprocess
    import sys

    model, text = _model(tmp_path)
    _interrupted(monkeypatch, model, text, tmp_path / "out")
    command = [sys.executable, "-m", "fxslice.cli", "prune", model, "--target", "0.2", "--shots", "1", "--calibration",
               text, "--calib-windows", "4", "--calib-length", "32", "--eval", "none", "--out", str(tmp_path / "out")]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "holds the checkpoint of another run" in refused.stderr
    assert "--restart" in refused.stderr and (tmp_path / "out.resume").is_dir()
    done = subprocess.run([*command, "--restart"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "out.resume").exists()
    assert json.loads((tmp_path / "out" / "fxslice.json").read_text())["recipe"]["stages"][1]["stage"] == "surgeon"


def test_a_checkpoint_that_cannot_be_written_does_not_stop_the_run(tmp_path, monkeypatch):
    from fxslice import SaveFailed
    from fxslice.jobs.checkpoint import JobCheckpoint

    def full_disk(self, *args, **kwargs):
        raise SaveFailed("no space left on device")

    monkeypatch.setattr(JobCheckpoint, "write", full_disk)
    model, text = _model(tmp_path)
    report, notes = _compress(model, text, tmp_path / "out")
    assert notes == [f"no checkpoint after stage {k} (no space left on device); the run goes on without it"
                     for k in (2, 3, 4)]
    assert report.out == tmp_path / "out" and (tmp_path / "out" / "fxslice.json").is_file()
