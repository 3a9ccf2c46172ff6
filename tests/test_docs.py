"""Every Python block of the guides runs, in order, as a reader would paste them."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the guides whose code runs here on tiny models (the others show commands on full-size models)
GUIDES = [ROOT / "docs" / "writing-passes.md"]


#: the pages whose code uses the default model and full-size calibration: run on a tiny Llama, sizes shrunk
ON_A_TINY_MODEL = [ROOT / "README.md", ROOT / "docs" / "python.md"]
#: full-size numbers in those pages -> what a tiny model with a character tokenizer takes in seconds
SHRINK = {"length=2048": "length=32", "length=512": "length=32", "windows=32": "windows=4", "windows=8": "windows=4",
          "eval_windows=16": "eval_windows=2", "2048)[:16]": "32)[:2]", "max_new_tokens=40": "max_new_tokens=5"}
#: written before a block that cannot run here, with the reason
NOT_RUN = "<!-- not run:"


def python_blocks(text: str) -> list[str]:
    """The page's Python blocks, less those marked `<!-- not run: why -->` on the line before."""
    return [code for marker, code in re.findall(r"(<!-- not run:[^>]*-->\n)?```python\n(.*?)```", text, flags=re.DOTALL)
            if not marker]


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


@pytest.mark.parametrize("page", ON_A_TINY_MODEL, ids=[p.name for p in ON_A_TINY_MODEL])
def test_every_python_block_of_a_page_runs_on_a_tiny_model(page, tiny_model_dir, tmp_path, monkeypatch):
    """The README's and the Python guide's code, as written, but on a tiny Llama (its directory in place of
    "smollm2") with small windows, in an empty folder: what it saves and loads, it saves and loads there."""
    model = tiny_model_dir("llama")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__guide__"}
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    assert blocks, f"{page.name} has no Python block to run"
    for i, block in enumerate(blocks):
        code = block.replace('"smollm2"', repr(str(model)))
        for full, small in SHRINK.items():
            code = code.replace(full, small)
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{page.name}, Python block {i} failed: {type(exc).__name__}: {exc}\n{code}") from exc
    assert any(p.is_dir() for p in tmp_path.iterdir()), "the page's code saved no model"


def test_the_cli_reference_is_what_the_cli_says():
    """docs/reference/cli.md is generated from the typer app; regenerate it when a command changes:
    `python -m typer fxslice.cli utils docs --name fxslice --output docs/reference/cli.md`."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "typer", "fxslice.cli", "utils", "docs", "--name", "fxslice"],
                         capture_output=True, text=True, check=True).stdout
    committed = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    assert out.strip() == committed.strip(), "docs/reference/cli.md is stale: regenerate it (see this test's docstring)"


def test_every_page_is_in_the_site_and_the_site_builds_strictly(tmp_path):
    import os
    import subprocess
    import sys

    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert all(page in config for page in pages), f"pages missing from mkdocs.yml's nav: {sorted(p for p in pages if p not in config)}"
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-3000:]
