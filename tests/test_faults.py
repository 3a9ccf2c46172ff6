"""Fault injection: a full disk, Ctrl-C and SIGTERM, another writer, swapped or truncated files, text that is
not text. Each ends in one message and a distinct non-zero exit code, with nothing half-written left behind."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fxslice import BadInput, CaptureError, CorruptModel, SaveFailed
from fxslice.models import io
from fxslice.models.io import GRAPH, RECORD, load, save
from fxslice.testing import tiny_causal_lm


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=300)


def test_a_full_disk_at_any_point_of_the_save_is_one_error_and_leaves_nothing(tmp_path):
    """A file-size limit (what a full disk looks like to the writer) at several sizes: before, inside and after
    the weights, the graph and the tokenizer."""
    done = _run("""
        import resource, signal, sys
        from pathlib import Path
        from fxslice import SaveFailed, capture
        from fxslice.models.io import save
        from fxslice.testing import tiny_causal_lm
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        program = capture(tiny_causal_lm("llama"))
        root = Path(sys.argv[1])
        for limit in (0, 1_000, 200_000, 450_000):
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            try:
                save(program, root / f"m{limit}")
                print("saved", limit)
            except SaveFailed as exc:
                print("refused", limit, str(exc).splitlines()[0])
            print("left", sorted(p.name for p in root.iterdir()))
        """, str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    refused = [line for line in lines if line.startswith("refused")]
    assert len(refused) >= 3 and all("nothing was left behind" in line for line in refused), done.stdout
    saved: list[str] = []
    for line in lines:  # after each attempt, exactly the saves that succeeded so far are on disk
        if line.startswith("saved"):
            saved.append("m" + line.split()[1])
        if line.startswith("left"):
            assert line == f"left {sorted(saved)!r}", done.stdout
    for name in saved:
        load(tmp_path / name)  # whatever was written completely loads


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    program = __import__("fxslice").capture(tiny_causal_lm("llama"))
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SaveFailed, match="not enough space"):
        save(program, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_another_writer_to_the_same_output_wins_cleanly(tmp_path, monkeypatch):
    from fxslice import capture

    program = capture(tiny_causal_lm("llama"))
    out = tmp_path / "model"
    real = io._sha256
    other = capture(tiny_causal_lm("llama", seed=1))

    def meanwhile(path):  # another process finishes the same --out while this one writes
        if not out.exists():
            monkeypatch.setattr(io, "_sha256", real)
            save(other, out)
        return real(path)

    monkeypatch.setattr(io, "_sha256", meanwhile)
    with pytest.raises(SaveFailed, match="another process"):
        save(program, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    theirs = load(out)
    torch.testing.assert_close(theirs(theirs.probe_input()), other(theirs.probe_input()))


POINTS = {  # where the signal arrives: (command, module, attribute wrapped to send it after running)
    "slice: calibration": ("slice", "fxslice.calibration.runner", "StagedRunner.run_through"),
    "prune: curvature": ("prune", "fxslice.calibration.moments", "run_with_gradients"),
    "slice: weights written": ("slice", "fxslice.models.io", "write_tensors"),
    "slice: tokenizer written": ("slice", "transformers", "PreTrainedTokenizerBase.save_pretrained"),
}


@pytest.mark.parametrize("signal_name,code", [("SIGINT", 130), ("SIGTERM", 143)])
@pytest.mark.parametrize("point", list(POINTS))
def test_a_signal_exits_non_zero_and_leaves_nothing(tiny_model_dir, tmp_path, signal_name, code, point):
    """The real signal, delivered to the CLI process at several points (a wrapped function sends it)."""
    import hashlib

    command, module, attribute = POINTS[point]
    source = tiny_model_dir("llama")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.rglob("*") if p.is_file()}
    done = _run(f"""
        import importlib, os, signal, sys
        owner = importlib.import_module({module!r})
        *path, name = {attribute!r}.split(".")
        for part in path:
            owner = getattr(owner, part)
        real = getattr(owner, name)
        def interrupted(*args, **kwargs):
            result = real(*args, **kwargs)
            os.kill(os.getpid(), signal.{signal_name})
            return result
        setattr(owner, name, interrupted)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a terminal, even under `pytest &`
        from fxslice.cli import run
        sys.argv = ["fxslice"] + sys.argv[1:]
        run()
        """, command, str(source), "--out", str(tmp_path / "out"), "--calib-windows", "2", "--calib-length", "64",
        "--eval", "none", *(["--shots", "1"] if command == "prune" else []))
    assert done.returncode == code, done.stderr[-2000:]
    assert ("interrupted" if code == 130 else "terminated") in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]  # no output, no partial directory
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in source.rglob("*") if p.is_file()}
    assert after == before


def test_a_truncated_tokenizer_file_is_named_not_taken_for_a_missing_one(tiny_model_dir):
    from fxslice.models.capture import load_model

    source = tiny_model_dir("llama")
    path = source / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CaptureError, match="tokenizer.json"):
        load_model(source)


@pytest.fixture
def saved_pair(tmp_path):
    """Two saved models with the same weight names and shapes (another seed, another activation)."""
    from fxslice import capture

    first = tiny_causal_lm("llama")
    second = tiny_causal_lm("llama", seed=1)
    second.config.hidden_act = "gelu"
    second = type(second)(second.config)
    return save(capture(first), tmp_path / "a"), save(capture(second), tmp_path / "b")


def test_a_graph_from_another_model_is_refused_naming_the_file(saved_pair):
    a, b = saved_pair
    shutil.copy(b / GRAPH, a / GRAPH)
    with pytest.raises(CorruptModel, match=GRAPH):
        load(a)


@pytest.mark.parametrize("victim", [GRAPH, "tokenizer"])
def test_truncated_files_are_refused(saved_pair, tmp_path, victim, char_tokenizer):
    a, _ = saved_pair
    if victim == "tokenizer":  # give the saved model a tokenizer first, then cut one of its files
        program = load(a)
        program.tokenizer = char_tokenizer
        a = save(program, tmp_path / "with_tokenizer")
        path = next(p for p in sorted((a / "tokenizer").iterdir()) if p.stat().st_size > 100)
    else:
        path = a / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptModel, match="checksum"):
        load(a)


def test_a_graph_reading_weights_the_file_lacks_is_refused_without_a_traceback(saved_pair):
    a, _ = saved_pair
    record = json.loads((a / RECORD).read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(str(a / "model.safetensors"))
    weights["renamed"] = weights.pop(sorted(weights)[0])
    save_file(weights, str(a / "model.safetensors"))
    record["weights_sha256"] = io._sha256(a / "model.safetensors")
    record["weights"] = {k: list(v.shape) for k, v in weights.items()}
    (a / RECORD).write_text(json.dumps(record))
    with pytest.raises(CorruptModel, match="does not hold"):
        load(a)


def test_text_of_control_characters_is_refused(tmp_path):
    from fxslice.data import load_text

    path = tmp_path / "nul.txt"
    path.write_text("\x00" * 5000 + "a few words", encoding="utf-8")
    with pytest.raises(BadInput, match="control characters"):
        load_text(path)


def test_calibration_of_one_repeated_token_is_refused(tmp_path, tiny, char_tokenizer):
    from fxslice.recipes import Calibration

    _, program = tiny("llama")
    program.tokenizer = char_tokenizer
    path = tmp_path / "same.txt"
    path.write_text("a" * 20_000, encoding="utf-8")
    with pytest.raises(BadInput, match="distinct token"):
        Calibration(source=str(path), windows=4, length=64).load(program)


def test_a_truncated_gguf_is_one_capture_error(tmp_path):
    from fxslice.models.capture import default_model_path, load_model

    cut = tmp_path / "cut.gguf"
    with default_model_path().open("rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(CaptureError, match="truncated"):
        load_model(cut)


@pytest.mark.parametrize("option", ["--eval-windows", "--calib-windows", "--calib-length", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_numeric_options_outside_their_domain_are_refused_by_name(option, value):
    from typer.testing import CliRunner

    from fxslice.cli import app

    result = CliRunner().invoke(app, ["slice", "smollm2", option, value, "--out", "/nonexistent/x"])
    assert result.exit_code == 2 and option in result.output


def test_capture_in_float64_gives_a_program_slicing_accepts(tiny_model_dir):
    from fxslice import capture
    from fxslice.passes.slicegpt.pipeline import slicegpt
    from fxslice.passes.slicegpt.slice_stream import constant_widths

    program = capture(tiny_model_dir("llama"), dtype=torch.float64)
    assert program.dtype == torch.float64
    windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    result = slicegpt(program, windows, constant_widths(0.25), batch_size=2)
    assert result.segments


@pytest.mark.parametrize("fmt", ["pt2", "hf"])
def test_a_full_disk_during_export_is_one_error_and_leaves_nothing(tmp_path, fmt):
    """The CLI's export under a file-size limit: one line, exit 8, no traceback (torch's zip writer would abort the
    process), nothing left beside the model."""
    save(capture_tiny(), tmp_path / "model")
    done = _run("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
        from fxslice.cli import run
        sys.argv = ["fxslice"] + sys.argv[1:]
        run()
        """, "export", str(tmp_path / "model"), "--format", fmt, "--out", str(tmp_path / "out"))
    assert done.returncode == SaveFailed.exit_code, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "nothing was left behind" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("where", ["inside the model", "an existing file", "a missing directory"])
def test_export_refuses_outputs_it_must_not_write_before_loading(tmp_path, where):
    save(capture_tiny(), tmp_path / "model")
    (tmp_path / "taken.pt2").write_text("mine")
    out = {"inside the model": tmp_path / "model" / "tokenizer" / "x.pt2", "an existing file": tmp_path / "taken.pt2",
           "a missing directory": tmp_path / "missing" / "x.pt2"}[where]
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", "export", str(tmp_path / "model"), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 3
    assert (tmp_path / "taken.pt2").read_text() == "mine"
    load(tmp_path / "model")  # the model is untouched


@pytest.mark.parametrize("command,message", [
    (["eval", "{model}", "--eval", "none"], "nothing to measure"),
    (["eval", "{model}", "--output", "{tmp}"], "is a directory"),
    (["eval", "{model}", "--tasks", "x", "--include", "{tmp}/nope"], "not a directory"),
    (["quantize", "{model}", "--search", "gp", "--out", "{tmp}/q"], "--budget-bits"),
    (["quantize", "{model}", "--log", "{tmp}/log", "--out", "{tmp}/q"], "--budget-bits"),
])
def test_options_that_would_be_ignored_or_lose_the_result_are_refused_first(tmp_path, command, message):
    save(capture_tiny(), tmp_path / "model")
    args = [a.format(model=tmp_path / "model", tmp=tmp_path) for a in command]
    done = subprocess.run([sys.executable, "-m", "fxslice.cli", *args], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in " ".join(done.stderr.split()) and "Traceback" not in done.stderr


def capture_tiny():
    from fxslice import capture

    return capture(tiny_causal_lm("llama"))


@pytest.mark.parametrize("options,message", [
    ({"damp": -0.1}, "damp"), ({"damp": float("nan")}, "damp"), ({"damp": float("inf")}, "damp"),
    ({"log": "x.jsonl"}, "needs search"),
])
def test_quantize_options_are_refused_when_the_stage_is_made(options, message):
    from fxslice import InvalidOption
    from fxslice.passes.quantize.stages import Quantize

    with pytest.raises(InvalidOption, match=message):
        Quantize(**options)


def test_a_group_wider_than_every_matrix_is_refused_before_calibration(tiny):
    from fxslice import InvalidOption, Recipe
    from fxslice.passes.quantize.stages import Quantize
    from fxslice.passes.rewrite.stages import Cleanup

    _, program = tiny("llama")  # the widest matrix has 128 columns
    recipe = Recipe((Cleanup(), Quantize(group_size=4096)))
    with pytest.raises(InvalidOption, match="group_size 4096 is wider than any matrix"):
        recipe.run(program)  # no calibration given: refused before it would be needed


def test_an_unmet_pruning_target_is_a_warning_with_the_share_removed_or_an_error_when_strict(tiny):
    from fxslice import InvalidOption
    from fxslice.passes import prune_recipe

    calibration = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    _, program = tiny("llama")
    with pytest.raises(InvalidOption, match=r"target 95.0% is more than this model's groups can give: at most"):
        prune_recipe(target=0.95, shots=1, batch_size=4).run(program, calibration=calibration)
    result = prune_recipe(target=0.66, shots=1, batch_size=4).run(tiny("llama")[1], calibration=calibration)
    report = result.stages[1][1].report
    assert report["achieved"] < 0.655 and "short of the target 66.0%" in report["warning"]
    assert f"warning      {report['warning']}" in result.stages[1][0].summary(result.stages[1][1])
    with pytest.raises(InvalidOption, match="short of the target"):
        prune_recipe(target=0.66, shots=1, batch_size=4, strict=True).run(tiny("llama")[1], calibration=calibration)


@pytest.mark.parametrize("signal_name,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_export_exits_non_zero_and_leaves_nothing(tmp_path, signal_name, code):
    save(capture_tiny(), tmp_path / "model")
    done = _run(f"""
        import os, signal, sys, torch
        real = torch.export.save
        def interrupted(*args, **kwargs):
            real(*args, **kwargs)
            os.kill(os.getpid(), signal.{signal_name})
        torch.export.save = interrupted
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from fxslice.cli import run
        sys.argv = ["fxslice"] + sys.argv[1:]
        run()
        """, "export", str(tmp_path / "model"), "--out", str(tmp_path / "out.pt2"))
    assert done.returncode == code, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
