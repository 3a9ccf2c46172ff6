"""Bad weights, bad tokens, bad output paths, interrupted saves, unhealthy calibration: one clear error each,
nothing half-written, the source untouched."""

import hashlib
import subprocess
import sys

import pytest
import torch

from fxslice import BadInput, CorruptModel, InvalidOption
from fxslice.core.graph import set_tensor, tensor_of
from fxslice.core.health import check_tokens
from fxslice.models.io import load, save
from fxslice.passes.slicegpt.pipeline import slicegpt
from fxslice.passes.slicegpt.slice_stream import constant_widths
from fxslice.testing import tiny_causal_lm

CALIBRATION = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_before_calibration_naming_the_parameter(tiny, value):
    _, program = tiny("llama")
    name = "model.layers.1.mlp.down_proj.weight"
    weight = tensor_of(program.gm, name).clone()
    weight[3, 5] = value
    set_tensor(program.gm, name, weight)
    with pytest.raises(BadInput, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*(NaN|Inf)"):
        slicegpt(program, CALIBRATION, constant_widths(0.25), batch_size=4)


def test_tokens_from_another_tokenizer_are_refused(tiny):
    _, program = tiny("llama")  # vocabulary of 128
    with pytest.raises(BadInput, match="tokenized for another model"):
        slicegpt(program, CALIBRATION + 100, constant_widths(0.25), batch_size=4)

    class BigTokenizer:
        def __len__(self):
            return 50_000

    with pytest.raises(BadInput, match="do not belong together"):
        check_tokens(program, CALIBRATION, BigTokenizer())


def test_calibration_that_carries_no_signal_is_refused_with_its_segment(tiny):
    _, program = tiny("llama")
    set_tensor(program.gm, "model.embed_tokens.weight", torch.zeros(128, 64))
    with pytest.raises(BadInput, match=r"segment 0 .*all zero"):
        slicegpt(program, CALIBRATION, constant_widths(0.25), batch_size=4)


def test_too_little_calibration_data_is_reported_per_segment(tiny):
    _, program = tiny("llama")
    result = slicegpt(program, CALIBRATION[:1, :8], constant_widths(0.25), batch_size=1)
    assert all("rank" in r.warning and "kept width 48" in r.warning for r in result.segments)
    healthy = slicegpt(tiny("llama")[1], CALIBRATION, constant_widths(0.25), batch_size=4)
    assert not any(r.warning for r in healthy.segments)


@pytest.mark.parametrize("where", ["parent is a file", "parent missing"])
def test_unwritable_output_paths_are_refused(tiny, tmp_path, where):
    _, program = tiny("llama")
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "model" if where == "parent is a file" else tmp_path / "missing" / "model"
    with pytest.raises(InvalidOption):
        save(program, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, MemoryError])
def test_a_save_interrupted_half_way_leaves_nothing_load_accepts(tiny, tmp_path, monkeypatch, interruption):
    _, program = tiny("llama")
    import fxslice.models.io

    real = fxslice.models.io.write_tensors

    def half_then_die(path, tensors, *args, **kwargs):
        real(path, dict(list(tensors.items())[:3]))  # a partial weights file is on disk ...
        raise interruption()  # ... when the process is interrupted

    monkeypatch.setattr(fxslice.models.io, "write_tensors", half_then_die)
    with pytest.raises(interruption):
        save(program, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CorruptModel):
        load(tmp_path / "model")


def test_a_mismatched_tokenizer_is_refused_and_the_source_is_never_modified(tmp_path, smollm2_tokenizer):
    source = tmp_path / "gpt2"
    tiny_causal_lm("gpt2").save_pretrained(source)  # vocabulary of 128 ...
    smollm2_tokenizer.save_pretrained(source)  # ... next to a tokenizer of 49,152 tokens

    def digests():
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(source.iterdir())}

    before = digests()
    result = subprocess.run([sys.executable, "-m", "fxslice.cli", "slice", str(source), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == BadInput.exit_code, result.stderr[-1500:]
    assert "do not belong together" in result.stderr and "Traceback" not in result.stderr
    assert digests() == before and not (tmp_path / "out").exists()
