"""Text to token windows: WikiText-2 (carried with fxslice), local files and directories, HF datasets.

Perplexity protocol (design.md §5): join the rows with "\\n\\n", tokenize once, cut non-overlapping
windows of `length` tokens, mean token NLL, exp. Calibration samples `count` windows with a seed.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch

from fxslice.core.errors import BadInput, InvalidOption

__all__ = ["check_prose", "check_varied", "load_text", "token_windows", "WIKITEXT2"]

WIKITEXT2 = {"wikitext2:test": "wiki.test.raw", "wikitext2:validation": "wiki.valid.raw"}


def _rows_to_text(lines: list[str]) -> str:
    return "\n\n".join(line if line.strip() else "" for line in lines)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path} is not UTF-8 text (byte {exc.start}); convert it with iconv or pass another file") from None


def load_text(source: str | Path) -> str:
    """'wikitext2:test' / 'wikitext2:validation', a text file, a directory of .txt/.raw files, or 'hf:NAME[:CONFIG]:SPLIT'."""
    key = str(source)
    if key in WIKITEXT2:
        raw = resources.files("fxslice").joinpath("data/wikitext-2-raw", WIKITEXT2[key]).read_text(encoding="utf-8")
        return _rows_to_text(raw.splitlines(keepends=True))
    if key.startswith("hf:"):
        return _hf_text(key[3:])
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".raw") and p.is_file())
        if not files:
            raise BadInput(f"directory {path} holds no .txt or .raw files")
        text = "\n\n".join(_read(p) for p in files)
    elif path.is_file():
        text = _read(path)
    else:
        raise BadInput(f"no such text source: {source!r}; use wikitext2:test, wikitext2:validation, a file, a directory "
                       "or hf:NAME[:CONFIG]:SPLIT")
    if not text.strip():
        raise BadInput(f"text source {source!r} is empty")
    check_prose(text, str(source))
    return text


def check_prose(text: str, source: str) -> None:
    """Refuse text that is mostly control characters (NUL bytes are valid UTF-8): statistics of it describe
    nothing a model will see, and calibrating on it wrecks the model without an error."""
    sample = text[: 1 << 20]
    control = sum(1 for c in sample if ord(c) < 32 and c not in "\n\r\t") + sample.count("\x7f")
    if control > 0.2 * len(sample):
        raise BadInput(f"text source {source!r} is {control / len(sample):.0%} control characters (NUL bytes, say), "
                       "not text; give it real text in the model's language")


def check_varied(windows: torch.Tensor, source: str) -> None:
    """Refuse calibration windows of (almost) one repeated token: their covariance and curvature are degenerate."""
    distinct = int(windows.unique().numel())
    if windows.numel() and distinct < max(8, min(64, windows.numel() // 100)):
        raise BadInput(f"the calibration windows from {source!r} hold only {distinct} distinct token(s) in "
                       f"{windows.numel()}: that is not text statistics can be taken from; use real text")


def _hf_text(spec: str) -> str:
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise InvalidOption(f"hf dataset spec must be hf:NAME[:CONFIG]:SPLIT, got hf:{spec}")
    try:
        import datasets
    except ImportError:
        raise BadInput("hf: text sources need `pip install datasets` and network access") from None
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    rows = datasets.load_dataset(name, config, split=split)["text"]
    return "\n\n".join(rows)


def token_windows(
    tokenizer: Any, text: str, length: int, *, count: int | None = None, seed: int = 0, max_length: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows [n, length] of the tokenized text; `count` sampled with `seed`, else all in order."""
    if length < 2:
        raise InvalidOption(f"window length must be at least 2 tokens, got {length}")
    if max_length is not None and length > max_length:
        raise InvalidOption(f"window length {length} exceeds the model's context of {max_length} tokens")
    if tokenizer is None:
        raise BadInput("this model has no tokenizer; pass a model directory or GGUF file that includes one")
    ids = torch.tensor(tokenizer(text, return_tensors=None)["input_ids"], dtype=torch.long)
    n = ids.numel() // length
    if n == 0:
        raise BadInput(f"the text has {ids.numel()} tokens, fewer than one window of {length}; use more text or "
                       "shorter windows")
    windows = ids[: n * length].view(n, length)
    if count is None:
        return windows
    if count < 1:
        raise InvalidOption(f"number of windows must be positive, got {count}")
    if count > n:
        raise BadInput(f"asked for {count} windows of {length} tokens but the text has only {n}")
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    return windows[pick.sort().values]
