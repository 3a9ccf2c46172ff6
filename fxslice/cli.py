"""The `fxslice` command line: errors are one clear message and a distinct exit code (`--debug` shows the trace)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fxslice.capture import DEFAULT_MODEL, capture
from fxslice.errors import FxsliceError, InvalidOption
from fxslice.infra import Pass, PassManager
from fxslice.program import Program

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SliceGPT as a graph-transform compiler over torch.fx.")
err = Console(stderr=True)
out = Console()
_debug = False

ModelArg = Annotated[str, typer.Argument(help="hub name, HF directory, .gguf file, or 'smollm2' (the embedded default)")]


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="show full tracebacks")] = False) -> None:
    global _debug
    _debug = debug


def _capture(model: str) -> Program:
    with err.status(f"loading and capturing {model} ..."):
        return capture(model)


def _builtin_passes() -> dict[str, Callable[[], Pass]]:
    import passes
    from fxslice.rotations import random_orthogonal

    return {
        "cleanup": passes.CleanupIR,
        "project_norm_writers": passes.ProjectNormWriters,
        "fuse_norms": passes.FuseNorms,
        "rotate_random": lambda: passes.RotateStream(random_orthogonal(0)),
    }


def _load_pass(spec: str) -> Pass:
    """A built-in pass name, or `module.path:Name` / `file.py:Name` naming a Pass class, instance or function."""
    builtins = _builtin_passes()
    if spec in builtins:
        return builtins[spec]()
    source, _, attr = spec.partition(":")
    if not attr:
        raise InvalidOption(f"unknown pass '{spec}'; built-in: {', '.join(builtins)}; or give module:Name / file.py:Name")
    if source.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(Path(source).stem, source)
        if module_spec is None or not Path(source).is_file():
            raise InvalidOption(f"pass file not found: {source}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        module = importlib.import_module(source)
    obj = getattr(module, attr, None)
    if obj is None:
        raise InvalidOption(f"'{source}' has no attribute '{attr}'")
    if isinstance(obj, type) and issubclass(obj, Pass):
        return obj()
    return obj if isinstance(obj, Pass) else PassManager([obj]).passes[0]


@app.command()
def inspect(
    model: ModelArg = DEFAULT_MODEL,
    stream: Annotated[bool, typer.Option("--stream", help="also print the residual stream: segments, norms, readers, writers")] = False,
) -> None:
    """Capture MODEL and print a summary: parameters, op counts, the module tree the graph came from."""
    from fxslice.summary import summarize

    program = _capture(model)
    out.print(summarize(program), highlight=False, markup=False)
    if stream:
        import passes
        from fxslice.stream import stream_analysis

        PassManager([passes.CleanupIR()]).run(program)
        out.print(program.analysis(stream_analysis).describe(), highlight=False, markup=False)


@app.command()
def diff(
    model: ModelArg = DEFAULT_MODEL,
    pass_: Annotated[list[str], typer.Option("--pass", "-p", help="pass to run (repeatable): built-in name or module:Name")] = ["cleanup"],  # noqa: B006
    html: Annotated[Path | None, typer.Option(help="also write a self-contained HTML view here")] = None,
    check: Annotated[bool, typer.Option(help="check numerically that exact passes keep the logits")] = True,
) -> None:
    """Run a pipeline on MODEL and show what each pass changed (nodes added/removed/rewired, parameters)."""
    pipeline = [_load_pass(s) for s in pass_]
    program = _capture(model)
    result = PassManager(pipeline, check_numerics=check, progress=True).run(program)
    out.print(result.text(), highlight=False, markup=False)
    if html is not None:
        tmp = html.with_name(html.name + ".partial")
        tmp.write_text(result.html(), encoding="utf-8")
        tmp.replace(html)
        err.print(f"wrote {html}")


def run() -> None:
    """Entry point: FxsliceError -> message and its exit code, no traceback unless --debug."""
    try:
        app(standalone_mode=False)
    except FxsliceError as exc:
        if _debug:
            raise
        err.print(f"[bold red]error:[/] {type(exc).__name__}: ", end="")
        err.print(str(exc), markup=False, highlight=False)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    run()
