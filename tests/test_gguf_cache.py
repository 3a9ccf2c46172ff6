"""A GGUF file is converted once: later loads read the copy, with the same weights and tokenizer, and a copy that
cannot be written or is damaged costs only the speed-up."""

import warnings

import pytest
import torch

from fxslice.core.errors import CaptureError
from fxslice.models import gguf_cache
from fxslice.models.capture import default_model_path, load_model
from fxslice.testing import tiny_causal_lm


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FXSLICE_CACHE", str(root))
    return root


@pytest.mark.slow
def test_the_embedded_gguf_is_converted_once_to_the_same_model_and_tokenizer(cache):
    direct, direct_tokenizer = load_model("smollm2")
    copy = gguf_cache.converted_copy(default_model_path())
    assert copy is not None and copy.parent.parent == cache
    assert [p.name for p in copy.parent.iterdir()] == [copy.name]  # no partial folder left beside it
    again, tokenizer = load_model("smollm2")
    assert getattr(again, "hf_quantizer", None) is None and direct.hf_quantizer is not None  # the loader's own kept
    ours, theirs = direct.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert again.lm_head.weight is again.model.embed_tokens.weight  # still tied
    text = "The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building.\n = Notes =\n"
    assert tokenizer(text).input_ids == direct_tokenizer(text).input_ids
    assert tokenizer.chat_template == direct_tokenizer.chat_template
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (direct_tokenizer.bos_token_id,
                                                                direct_tokenizer.eos_token_id)
    halved, _ = load_model("smollm2", dtype=torch.bfloat16)  # another dtype reads the same copy
    assert torch.equal(halved.model.norm.weight, direct.model.norm.weight.bfloat16())


def _fake_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    return path


def test_a_stored_copy_is_found_and_loads_as_the_model(cache, tmp_path):
    gguf = _fake_gguf(tmp_path)
    model = tiny_causal_lm("llama")
    assert gguf_cache.converted_copy(gguf) is None
    copy = gguf_cache.store_converted(gguf, model, None)
    assert copy == gguf_cache.converted_copy(gguf)
    loaded, _ = load_model(gguf)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    gguf.write_bytes(gguf.read_bytes() + b"changed")  # another file at the same path is another copy
    assert gguf_cache.converted_copy(gguf) is None


def test_a_failed_save_warns_and_leaves_nothing_behind(cache, tmp_path, monkeypatch):
    gguf = _fake_gguf(tmp_path)
    model = tiny_causal_lm("llama")

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.warns(UserWarning, match="FXSLICE_CACHE"):
        assert gguf_cache.store_converted(gguf, model, None) is None
    assert list((cache / "gguf").iterdir()) == []
    assert gguf_cache.converted_copy(gguf) is None


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("FXSLICE_CACHE", "off")
    gguf = _fake_gguf(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gguf_cache.store_converted(gguf, tiny_causal_lm("llama"), None) is None
    assert gguf_cache.cache_root() is None and gguf_cache.converted_copy(gguf) is None


def test_a_damaged_copy_is_dropped_and_the_gguf_read_again(cache, tmp_path):
    cut = tmp_path / "cut.gguf"
    with default_model_path().open("rb") as f:
        cut.write_bytes(f.read(1 << 20))
    copy = gguf_cache.store_converted(cut, tiny_causal_lm("llama"), None)
    (copy / "model.safetensors").unlink()
    with pytest.raises(CaptureError, match="truncated"):  # the GGUF's own error, not the copy's
        load_model(cut)
    assert not copy.exists()
