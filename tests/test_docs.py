"""Every Python block of the guides runs, in order, as a reader would paste them."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the guides whose code runs here on tiny models (the others show commands on full-size models)
GUIDES = [ROOT / "docs" / "writing-passes.md"]


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
