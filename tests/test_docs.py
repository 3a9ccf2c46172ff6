"""Every Python block of the guides runs, in order, as a reader would paste them."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs").glob("*.md"))


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.parametrize("guide", GUIDES, ids=[g.name for g in GUIDES])
def test_every_python_block_of_a_guide_runs(guide, monkeypatch, capsys):
    blocks = python_blocks(guide.read_text(encoding="utf-8"))
    assert blocks, f"{guide.name} has no Python block"
    monkeypatch.chdir(ROOT)  # the guides name files from the repository's root
    namespace: dict = {"__name__": "__guide__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{guide.name}[block {i}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{guide.name}, Python block {i} failed: {type(exc).__name__}: {exc}") from exc
    printed = capsys.readouterr().out
    if guide.name == "writing-passes.md":
        assert "gelu_to_tanh (lossy" in printed and "logits moved" in printed
        assert "changed the logits of a float64 copy" in printed and "proved in float64" in printed
